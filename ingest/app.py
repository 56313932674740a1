"""The ingest app: built by a factory from a Settings object, clients owned by the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request

from core import kafka
from core.auth import auth_requires, auth_responses, open_key_store, require_scope
from core.health import kafka_ok
from core.http import MetricsMiddleware, ops_router
from core.problems import install_problem_handlers
from core.retry import retry_until
from core.settings import Settings, get_settings
from ingest.routes import IngestState, router
from ingest.writer import KafkaWriter

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[IngestState]:
        producer = kafka.producer(settings)
        await retry_until(producer.start, what="Kafka producer", deadline=60.0)
        await kafka.ensure_topics(settings, [settings.topic])
        writer = KafkaWriter(
            producer,
            settings.topic,
            max_inflight_bytes=settings.max_inflight_bytes,
            timeout=settings.produce_timeout_seconds,
            retry_after=settings.retry_after_seconds,
        )
        app.state.producer = producer
        keys = open_key_store(settings, app="tally-ingest")  # None when auth is off
        try:
            yield {"settings": settings, "writer": writer, "keys": keys}
        finally:
            app.state.draining = True
            await producer.stop()  # flushes what is pending
            if keys is not None:
                await keys.close()

    async def readiness(request: Request) -> dict[str, bool]:
        checks = {"kafka": await kafka_ok(request.app.state.producer.client)}
        keys = request.scope["state"]["keys"]
        if keys is not None:  # reported, not gating: keys verified in the last seconds still work
            checks["postgres"] = await keys.reachable()
        return checks

    app = FastAPI(
        title="Tally ingest",
        version="0.1.0",
        summary="POST event batches; a 202 means they are durable in Kafka.",
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    # /healthz, /readyz and /metrics (ops_router) stay open for probes and Prometheus.
    app.include_router(router, dependencies=[Depends(require_scope("ingest"))], responses=auth_responses("ingest"))
    app.include_router(ops_router(readiness, gating=frozenset({"kafka"})))
    app.add_middleware(MetricsMiddleware, service="ingest")
    return app


def app_from_env() -> FastAPI:
    settings = get_settings()
    settings.require("kafka_bootstrap", *auth_requires(settings))
    return create_app(settings)
