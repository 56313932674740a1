"""The consumer's own small HTTP server: /healthz, /readyz and /metrics on its metrics port.

It runs in the consumer's event loop (one process, one loop) and leaves signal
handling to `run`, which must finish the batch in flight before exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from core.health import kafka_ok, postgres_ok
from core.http import MetricsMiddleware, ops_router


class Health:
    """What /readyz checks; the consumer is filled in once it has started."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.consumer: Any | None = None

    async def readiness(self, request: Request) -> dict[str, bool]:
        consumer = self.consumer
        kafka = consumer is not None and await kafka_ok(consumer._client)
        return {"kafka": kafka, "postgres": await postgres_ok(self.engine)}


def build_app(health: Health) -> FastAPI:
    app = FastAPI(title="Tally consumer", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(ops_router(health.readiness))
    app.add_middleware(MetricsMiddleware, service="consumer")
    app.state.draining = False
    return app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # `run` owns SIGTERM/SIGINT: it drains the consumer first


def _listen(host: str, port: int) -> socket.socket:
    """Bind before serving, so a taken port fails start-up with an OSError, not a SystemExit."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class OpsServer:
    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.app = app
        self.host, self.port = host, port
        self.server = _Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = _listen(self.host, self.port)
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]), name="consumer-ops-http")
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("the metrics server exited before it started")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        await self.task
        self.task = None
