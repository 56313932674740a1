"""What every Tally HTTP service shares: metrics middleware, request ids, health routes.

The middleware is pure ASGI (no BaseHTTPMiddleware on the hot path) and labels
requests by route template, so `/v1/rollups/{name}` is one series, not one per name.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from types import FrameType

import orjson
from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import logs, metrics

log = logging.getLogger(__name__)
REQUEST_ID_HEADER = b"x-request-id"
ReadinessCheck = Callable[[Request], Awaitable[dict[str, bool]]]


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service
        self._in_progress = metrics.http_in_progress.labels(service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).append((REQUEST_ID_HEADER, request_id.encode()))
            await send(message)

        self._in_progress.inc()
        try:
            with logs.bound(request_id):
                await self.app(scope, receive, send_wrapper)
        finally:
            self._in_progress.dec()
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            metrics.http_requests.labels(self.service, template, scope["method"], str(status)).inc()
            metrics.http_latency.labels(self.service, template).observe(time.perf_counter() - start)


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER and 0 < len(value) <= 128:
            return str(value.decode("latin-1"))
    return uuid.uuid4().hex


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

    @router.get("/readyz", summary="Readiness: Kafka, Postgres and Redis reachable")
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
    """On SIGTERM, report not ready for `seconds` while still serving, then let uvicorn shut down.

    A balancer (nginx, a Kubernetes Service) stops sending only after it sees the
    readiness change; stopping to accept at once would refuse the requests already
    on their way. After the delay uvicorn's own handler runs: no new connections,
    in-flight requests get TALLY_SHUTDOWN_GRACE_SECONDS, then the lifespan flushes.
    A second SIGTERM or a SIGINT skips the rest of the delay. Call it from the lifespan
    startup, where uvicorn's handler is installed; it does nothing off the main thread
    (an app served from a test's thread).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    uvicorn_exit = signal.getsignal(signal.SIGTERM)
    if not callable(uvicorn_exit):
        return
    loop = asyncio.get_running_loop()

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if getattr(app.state, "draining", False):
            uvicorn_exit(signum, frame)
            return
        app.state.draining = True
        log.info("SIGTERM: not ready; serving %.1f s more while balancers notice, then shutting down", seconds)
        loop.call_soon_threadsafe(loop.call_later, seconds, uvicorn_exit, signum, frame)  # wakes the loop

    signal.signal(signal.SIGTERM, on_sigterm)
