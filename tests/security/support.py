"""Shared by the security tests: every route of an app, the routes that are public on purpose, keys.

Routes are enumerated from `app.routes` whatever their kind (FastAPI routes, plain
Starlette routes such as the docs pages, mounts), through included routers, so a
route added later is either checked for its scope or must be declared public here,
with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import fastapi.routing
from fastapi import FastAPI
from starlette.routing import Mount, WebSocketRoute

from core.auth import KeyStore

# Path -> why anyone may call it without a key. Every app must have exactly these.
PUBLIC: dict[str, str] = {
    "/healthz": "liveness probe: orchestrators hold no key; the answer is {'status': 'ok'}",
    "/readyz": "readiness probe for balancers and Kubernetes: which dependencies are up, no data",
    "/metrics": "Prometheus scrapes without a key: counters by route, status and reason, no event data",
    "/openapi.json": "the published contract: routes and parameters, no data",
    "/docs": "Swagger UI over /openapi.json; its calls carry the user's own key",
    "/docs/oauth2-redirect": "a static page FastAPI adds with /docs",
    "/redoc": "ReDoc over /openapi.json, a static page",
}
# Public on the query app only (the ingest app has none of these).
QUERY_PUBLIC: dict[str, str] = {
    "/console/": "the console's static HTML, script, styles and uPlot; all it shows comes from the API, "
    "called from the browser with the user's own key",
}
PATH_PARAMS = {"name": "events_by_type"}  # a route with a new path parameter needs a sample value here


@dataclass(frozen=True, slots=True)
class RouteInfo:
    path: str
    methods: frozenset[str]
    kind: str  # the route's class name


def app_routes(app: FastAPI) -> list[RouteInfo]:
    """Every route of `app`: FastAPI >= 0.16x keeps included routers as branches of `app.routes`
    (iter_route_contexts walks them); older versions copy each route into `app.routes`."""
    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    found: list[tuple[str, object, object]] = []
    if iter_contexts is None:
        found = [(getattr(r, "path", ""), getattr(r, "methods", None), r) for r in app.routes]
    else:
        found = [(c.path or "", getattr(c, "methods", None), c.original_route) for c in iter_contexts(app.routes)]
    out = []
    for path, methods, route in found:
        if isinstance(route, Mount):  # a mounted app (static files, a console) answers GET below its path
            out.append(RouteInfo(path.rstrip("/") + "/", frozenset({"GET"}), "Mount"))
        elif isinstance(route, WebSocketRoute):
            out.append(RouteInfo(path, frozenset({"WEBSOCKET"}), "WebSocketRoute"))
        else:
            assert isinstance(methods, set | frozenset) and path, f"a route this test cannot read: {route!r}"
            out.append(RouteInfo(path, frozenset(methods), type(route).__name__))
    return out


def public_routes(name: str) -> dict[str, str]:
    """What the app called `name` ("ingest" or "query") must serve without a key, and why."""
    return PUBLIC | (QUERY_PUBLIC if name == "query" else {})


def public_paths(app: FastAPI) -> set[str]:
    return {r.path for r in app_routes(app) if r.path in PUBLIC or r.path in QUERY_PUBLIC}


def protected_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, concrete path) of every route that is not declared public.

    HEAD is left out (Starlette adds it beside GET; it runs the same endpoint). A WebSocket
    route fails here: check its authentication in a test of its own, then let it through.
    """
    out = []
    for route in app_routes(app):
        if route.path in PUBLIC or route.path in QUERY_PUBLIC:
            continue
        assert route.kind != "WebSocketRoute", f"{route.path}: a WebSocket route needs its own auth check"
        try:
            path = route.path.format_map(PATH_PARAMS)
        except KeyError as exc:
            raise AssertionError(f"{route.path}: add a sample value for {exc} to PATH_PARAMS") from None
        out.extend((method, path) for method in sorted(route.methods - {"HEAD"}))
    return out


@dataclass
class Keys:
    ingest: str
    query: str
    admin: str


async def make_keys(store: KeyStore) -> Keys:
    _, ingest = await store.create("producer", ["ingest"])
    _, query = await store.create("dashboard", ["query"])
    _, admin = await store.create("ops", ["admin"])
    return Keys(ingest, query, admin)
