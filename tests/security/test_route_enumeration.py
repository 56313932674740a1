"""The route sweep of tests/integration/test_auth.py sees every kind of route, so it cannot miss a new one.

These build the real apps, add routes the way a later change might (a FastAPI route
without the scope dependency, a router included bare, a plain Starlette route, a
mounted app) and check that the enumeration lists them and that a no-key request,
the sweep's first check, catches exactly those.
"""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter, FastAPI, WebSocket
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from core.settings import Settings
from ingest.app import create_app as ingest_app
from query.app import create_app as query_app
from tests.conftest import serve
from tests.security.support import app_routes, protected_routes, public_paths, public_routes

# Building the apps connects to nothing; only the last test serves them.
OFFLINE = Settings(env="test", auth=True, kafka_bootstrap="127.0.0.1:9", postgres_url="postgresql://t@127.0.0.1:9/t",
                   redis_url="redis://127.0.0.1:9/0")


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("no key needed")


async def mounted(scope: Scope, receive: Receive, send: Send) -> None:
    await PlainTextResponse("mounted")(scope, receive, send)


def careless(app: FastAPI) -> set[tuple[str, str]]:
    """Add routes without authentication; return them as (method, concrete path)."""
    app.add_api_route("/v1/forgotten", hello, methods=["GET", "DELETE"])
    bare = APIRouter()
    bare.add_api_route("/v1/extra/{name}", hello)
    app.include_router(bare)
    app.router.routes.append(Route("/v1/raw", hello))
    app.mount("/admin", mounted)
    return {("GET", "/v1/forgotten"), ("DELETE", "/v1/forgotten"), ("GET", "/v1/extra/events_by_type"),
            ("GET", "/v1/raw"), ("GET", "/admin/")}


def test_both_apps_have_exactly_the_public_routes() -> None:
    expected = {
        "ingest": {("POST", "/v1/events")},
        "query": {("GET", "/v1/rollups"), ("GET", "/v1/rollups/events_by_type"), ("GET", "/v1/ops/lag"),
                  ("GET", "/v1/ops/counters")},
    }
    for name, app in (("ingest", ingest_app(OFFLINE)), ("query", query_app(OFFLINE))):
        assert public_paths(app) == set(public_routes(name)), name
        assert set(protected_routes(app)) == expected[name]
        kinds = {r.kind for r in app_routes(app)}
        # The docs pages are plain Starlette routes; the console is mounted static files.
        assert kinds == ({"APIRoute", "Route", "Mount"} if name == "query" else {"APIRoute", "Route"})


def test_new_path_parameters_and_websockets_must_be_declared() -> None:
    app = query_app(OFFLINE)
    app.add_api_route("/v1/things/{thing_id}", hello)
    with pytest.raises(AssertionError, match=r"sample value for 'thing_id'"):
        protected_routes(app)

    app = query_app(OFFLINE)

    @app.websocket("/v1/live")
    async def live(websocket: WebSocket) -> None:  # never connected
        await websocket.close()

    with pytest.raises(AssertionError, match="WebSocket route needs its own auth check"):
        protected_routes(app)


@pytest.mark.integration
async def test_a_route_added_without_auth_is_caught(migrated: Settings) -> None:
    on = migrated.model_copy(update={"auth": True})
    for app in (ingest_app(on), query_app(on)):
        added = careless(app)
        routes = protected_routes(app)
        assert added <= set(routes)
        open_ones = set()
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
            for method, path in routes:
                r = await http.request(method, path)
                if r.status_code != 401:
                    open_ones.add((method, path))
        assert open_ones == added  # the real routes refuse, every careless one is reported
