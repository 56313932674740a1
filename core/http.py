"""What every Tally HTTP service shares: metrics middleware, request ids, security headers, health routes.

The middleware is pure ASGI (no BaseHTTPMiddleware on the hot path) and labels
requests by route template, so `/v1/rollups/{name}` is one series, not one per name.
It is also the one place that stamps every response, errors and 404s included, with
the request id and the security headers, and that turns an unhandled exception into
a generic 500 problem (the traceback goes to the log, under the request id).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import logs, metrics
from core.problems import Unavailable, internal_error, problem_for, problem_response

log = logging.getLogger(__name__)
REQUEST_ID_HEADER = b"x-request-id"
ReadinessCheck = Callable[[Request], Awaitable[dict[str, bool]]]


# Security headers, built once. The APIs answer JSON (and CSV) only, so their policy
# forbids loading anything; HSTS is the TLS terminator's (nginx), not ours.
_COMMON_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
API_CSP = b"default-src 'none'; frame-ancestors 'none'"
# FastAPI's /docs (Swagger UI) and /redoc pages load their scripts and styles from
# cdn.jsdelivr.net, start them with an inline script, use inline styles and data: images,
# Redoc loads Google fonts and runs its search in a blob: worker; both fetch
# /openapi.json from this origin. They show no request data.
DOCS_CSP = (
    b"default-src 'none'; script-src 'unsafe-inline' https://cdn.jsdelivr.net; "
    b"style-src 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
    b"font-src https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly; "
    b"connect-src 'self'; worker-src blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
Headers = tuple[tuple[bytes, bytes], ...]


def page_headers(csp: bytes) -> Headers:
    """The security headers for a page that needs a content security policy of its own."""
    return (*_COMMON_HEADERS, (b"content-security-policy", csp))


API_HEADERS = page_headers(API_CSP)
# Path -> the headers of the pages at and below it; every other path gets API_HEADERS.
Pages = tuple[tuple[str, Headers], ...]
DOCS_PAGES: Pages = (("/docs", page_headers(DOCS_CSP)), ("/redoc", page_headers(DOCS_CSP)))
# Any token is a valid HTTP method: labelling series by the client's spelling would let
# anyone grow /metrics (and memory) without bound, one method name per series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, service: str, *, pages: Pages = ()) -> None:
        self.app = app
        self.service = service
        # (path, path + "/", headers), built once: this runs on every request.
        self._pages = tuple((path, path + "/", headers) for path, headers in (*DOCS_PAGES, *pages))
        self._in_progress = metrics.http_in_progress.labels(service)
        self._requests = metrics.Children(metrics.http_requests)  # route templates: a bounded set
        self._latency = metrics.Children(metrics.http_latency)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        stamp = ((REQUEST_ID_HEADER, request_id.encode("latin-1")), *self._security_headers(scope["path"]))
        status = 500
        started = False
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                # A new list: never append to a Response object's own header list.
                message["headers"] = [*message.get("headers", ()), *stamp]
            await send(message)

        self._in_progress.inc()
        try:
            with logs.bound(request_id):
                try:
                    await self.app(scope, receive, send_wrapper)
                except Exception:
                    # Starlette's own 500 answer is sent outside this middleware (no request id, no
                    # headers) and uvicorn logs the traceback without the request id: do both here.
                    log.exception(
                        "unhandled error answering %s %s",
                        scope["method"],
                        scope["path"],
                        extra={"request_id": request_id},  # also for handlers that do not read logs.request_id
                    )
                    if started:  # too late for an answer: uvicorn drops the connection
                        raise
                    await internal_error(scope["path"], request_id)(scope, receive, send_wrapper)
        finally:
            self._in_progress.dec()
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "other"
            self._requests(self.service, template, method, str(status)).inc()
            self._latency(self.service, template).observe(time.perf_counter() - start)

    def _security_headers(self, path: str) -> Headers:
        for page, below, headers in self._pages:
            if path == page or path.startswith(below):
                return headers
        return API_HEADERS


class HeaderLimit:
    """A pure ASGI middleware: a 431 problem+json when the headers total more than `max_bytes`.

    uvicorn's httptools parser puts no bound on header size (h11 bounds only what arrives in
    pieces), so a 100 KiB `Cookie` would reach the app and every dependency that parses
    headers. The proxy in front (nginx: 8 KiB per line) normally refuses these first; this
    keeps the answer the same, a 431 problem, when a service is reached directly.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Counted as sent: "name: value\r\n" per header.
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.max_bytes:
                response = problem_response(
                    431,
                    "Request header fields too large",
                    f"the request headers total {size} bytes; the limit is {self.max_bytes} (TALLY_MAX_HEADER_BYTES)",
                    slug="header-too-large",
                    instance=scope["path"],
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class InflightLimit:
    """A pure ASGI middleware: a fast 503 with Retry-After when `limit` requests are being served.

    Past the point where the database pool and the event loop are busy, more concurrent
    requests only queue: each waits longer and the process's memory grows with the queue.
    Refusing the excess at once keeps the latency of the served ones and tells the client
    (or the balancer) to go elsewhere or come back. The ops routes are never refused.
    """

    EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})

    def __init__(self, app: ASGIApp, service: str, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.serving = 0
        self.shed = metrics.http_shed.labels(service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.serving >= self.limit:
            self.shed.inc()
            refused = Unavailable(
                f"this process is serving {self.serving} requests, its limit (TALLY_QUERY_MAX_INFLIGHT)", retry_after=1
            )
            await problem_for(refused, scope["method"], scope["path"])(scope, receive, send)
            return
        self.serving += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.serving -= 1


def request_headers(scope: Scope, wanted: tuple[bytes, ...]) -> dict[bytes, str]:
    """The few request headers a plain ASGI route reads, each the first of its name (as Starlette's)."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in wanted and name not in found:
            found[name] = value.decode("latin-1")
    return found


def describe_plain_routes(app: FastAPI, described: list[BaseRoute]) -> None:
    """Let `app`'s OpenAPI include plain ASGI routes, from FastAPI routes that only describe them
    (never mounted; ingest.openapi, query.openapi), beside the app's own."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                description=app.description,
                routes=[*described, *app.routes],
                servers=app.servers,
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class HotRoute:
    """A pure ASGI middleware that hands the one route carrying a service's load straight to its
    endpoint, past Starlette's exception layer, FastAPI's exit stack and both routers (which try
    each route's pattern in turn): ~20 µs a request, a sixth of a cache hit (docs/performance.md).

    Added first, so innermost: the metrics, header and in-flight limits still wrap it. The
    endpoint is a plain ASGI app that answers its own errors (as problem+json) and names its
    route template in `scope["route"]`; the same endpoint stays mounted as a Starlette route,
    which answers what this does not take (other methods: a 405) and is what OpenAPI reads.
    `path` is a template with at most one `{parameter}`, as its last segment.
    """

    def __init__(self, app: ASGIApp, *, path: str, methods: frozenset[str], endpoint: ASGIApp) -> None:
        self.app = app
        self.endpoint = endpoint
        self.methods = methods
        head, brace, tail = path.partition("{")
        self.prefix = head
        self.parameter = tail.removesuffix("}") if brace else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in self.methods:
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root + "/"):
                path = path[len(root) :]
            if self.parameter is None:
                if path == self.prefix:
                    await self.endpoint(scope, receive, send)
                    return
            elif path.startswith(self.prefix):
                value = path[len(self.prefix) :]
                if value and "/" not in value:
                    scope["path_params"] = {self.parameter: value}
                    await self.endpoint(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class _RequestIds:
    """Unique request ids without a syscall each (uuid4 reads the kernel's random source every
    time): 16 random hex digits per process, then a counter. A forked worker draws its own."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count()

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


_ids = _RequestIds()


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER and 0 < len(value) <= 128:
            return str(value.decode("latin-1"))
    return _ids.new()


def ops_router(readiness: ReadinessCheck, *, gating: frozenset[str] | None = None) -> APIRouter:
    """`/healthz` (alive), `/readyz` (dependencies reachable, false while draining), `/metrics`.

    Every check is reported, but only the `gating` ones (default: all) make the
    process unready: a query replica that still answers from Postgres while Redis
    is down must stay in the load balancer, only marked degraded.
    """
    router = APIRouter(tags=["ops"])

    @router.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/readyz",
        summary="Readiness: Kafka, Postgres and Redis reachable",
        responses={503: {"description": "Not ready: a required dependency is down (see `degraded`), or draining"}},
    )
    async def readyz(request: Request) -> Response:
        checks = await readiness(request)
        draining = bool(getattr(request.app.state, "draining", False))
        required = checks.keys() if gating is None else gating
        ready = all(checks.get(name, False) for name in required) and not draining
        degraded = sorted(name for name, ok in checks.items() if not ok)
        body = {"ready": ready, "draining": draining, "checks": checks, "degraded": degraded}
        return Response(orjson.dumps(body), status_code=200 if ready else 503, media_type="application/json")

    @router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        payload, content_type = metrics.metrics_payload()
        return Response(payload, media_type=content_type)

    return router


def drain_on_sigterm(app: FastAPI, seconds: float) -> None:
    """On SIGTERM, report not ready for `seconds` while still serving, then let the server shut down.

    A balancer (nginx, a Kubernetes Service) stops sending only after it sees the
    readiness change; stopping to accept at once would refuse the requests already
    on their way. After the delay the server's own handler runs: no new connections,
    in-flight requests get TALLY_SHUTDOWN_GRACE_SECONDS, then the lifespan flushes.
    A second SIGTERM or a SIGINT skips the rest of the delay. Call it from the lifespan
    startup, where the server's handler is installed; it does nothing off the main thread
    (an app served from a test's thread).

    uvicorn handles SIGTERM in a Python handler (`signal.signal`): it is called after the
    delay. A Granian worker has its event loop run one handler for SIGINT and SIGTERM
    (`loop.add_signal_handler`), which cannot be read back: SIGTERM is taken over in the same
    loop, and after the delay the worker sends itself SIGINT, which Granian's handler stops on.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    server_exit = signal.getsignal(signal.SIGTERM)
    if _run_by_loop(server_exit, loop):
        _drain_in_loop(app, seconds, loop)
        return
    if not callable(server_exit):
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if getattr(app.state, "draining", False):
            server_exit(signum, frame)
            return
        _start_draining(app, seconds)
        loop.call_soon_threadsafe(loop.call_later, seconds, server_exit, signum, frame)  # wakes the loop

    signal.signal(signal.SIGTERM, on_sigterm)


def _run_by_loop(handler: object, loop: asyncio.AbstractEventLoop) -> bool:
    """Whether `handler` only wakes `loop`, which runs the handler registered with it:
    asyncio's no-op, or uvloop's method of the loop itself."""
    asyncio_noop = getattr(asyncio.unix_events, "_sighandler_noop", None)
    return handler is asyncio_noop or getattr(handler, "__self__", None) is loop


def _drain_in_loop(app: FastAPI, seconds: float, loop: asyncio.AbstractEventLoop) -> None:
    def stop() -> None:
        signal.raise_signal(signal.SIGINT)  # the server's own stop: Granian treats SIGINT as SIGTERM

    def on_sigterm() -> None:
        if getattr(app.state, "draining", False):
            stop()
            return
        _start_draining(app, seconds)
        loop.call_later(seconds, stop)

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)


def _start_draining(app: FastAPI, seconds: float) -> None:
    app.state.draining = True
    log.info("SIGTERM: not ready; serving %.1f s more while balancers notice, then shutting down", seconds)
