"""The ingest app: built by a factory from a Settings object, clients owned by the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from core import kafka
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
        try:
            yield {"settings": settings, "writer": writer}
        finally:
            app.state.draining = True
            await producer.stop()  # flushes what is pending

    async def readiness(request: Request) -> dict[str, bool]:
        return {"kafka": await kafka_ok(request.app.state.producer.client)}

    app = FastAPI(
        title="Tally ingest",
        version="0.1.0",
        summary="POST event batches; a 202 means they are durable in Kafka.",
        lifespan=lifespan,
    )
    install_problem_handlers(app)
    app.include_router(router)
    app.include_router(ops_router(readiness))
    app.add_middleware(MetricsMiddleware, service="ingest")
    return app


def app_from_env() -> FastAPI:
    settings = get_settings()
    settings.require("kafka_bootstrap")
    return create_app(settings)
