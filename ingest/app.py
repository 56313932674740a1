"""The ingest app: built by a factory from a Settings object, clients owned by the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.routing import Route

from core import kafka, logs
from core.auth import auth_requires, open_key_store
from core.cache import redis_client
from core.health import kafka_ok, redis_ok
from core.http import HeaderLimit, HotRoute, MetricsMiddleware, describe_plain_routes, drain_on_sigterm, ops_router
from core.looplag import LoopLagMonitor, settle_heap
from core.problems import install_problem_handlers
from core.settings import Settings, get_settings
from ingest.endpoint import PATH, IngestState, PostEvents
from ingest.idempotency import IdempotencyStore
from ingest.openapi import documented_routes
from ingest.ratelimit import RateLimiter
from ingest.writer import KafkaWriter

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[IngestState]:
        writer = KafkaWriter(
            lambda: kafka.producer(settings),
            settings.topic,
            max_inflight_bytes=settings.max_inflight_bytes,
            timeout=settings.produce_timeout_seconds,
            retry_after=settings.retry_after_seconds,
            breaker_seconds=settings.kafka_breaker_seconds,
        )
        redis = redis_client(str(settings.redis_url), max_connections=settings.redis_pool_size)
        # Idempotency has a pool of its own: a burst of rate-limit calls must not make the answer
        # of a batch already in Kafka wait past the pool's timeout and go unstored.
        idempotency_redis = redis_client(str(settings.redis_url), max_connections=settings.redis_pool_size)
        keys = open_key_store(settings, app="tally-ingest")  # None when auth is off
        writer.start()  # in the background: ingest serves (and refuses with 503) while Kafka is down
        app.state.writer = writer
        drain_on_sigterm(app, settings.drain_seconds)
        loop_lag = LoopLagMonitor("ingest")
        loop_lag.start()
        settle_heap()  # the collector's full passes, rare and over what requests made only
        try:
            yield {
                "settings": settings,
                "limits": settings.event_limits,
                "keys": keys,
                "writer": writer,
                "idempotency": IdempotencyStore(
                    idempotency_redis,
                    settings.cache_prefix,
                    ttl_seconds=settings.idempotency_ttl_seconds,
                    lock_seconds=settings.idempotency_lock_seconds,
                    retry_after=settings.retry_after_seconds,
                ),
                "limiter": RateLimiter(
                    redis,
                    settings.cache_prefix,
                    default_rate=settings.rate_limit_events_per_second,
                    burst_seconds=settings.rate_limit_burst_seconds,
                    lease_seconds=settings.rate_limit_lease_seconds,
                ),
            }
        finally:
            app.state.draining = True
            await loop_lag.stop()
            await writer.stop()  # flushes what is pending
            await redis.aclose()
            await idempotency_redis.aclose()
            if keys is not None:
                await keys.close()

    async def readiness(request: Request) -> dict[str, bool]:
        writer: KafkaWriter = request.app.state.writer
        producer = writer.producer
        kafka_up = producer is not None and writer.healthy and await kafka_ok(producer.client)
        checks = {"kafka": kafka_up, "redis": await redis_ok(request.scope["state"]["idempotency"].redis)}
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
    # The hot route is a plain ASGI app (authenticating for the `ingest` scope itself); OpenAPI
    # describes it from ingest.openapi. /healthz, /readyz and /metrics stay open for probes.
    # HotRoute hands it its requests past the framework's router; mounted too, for the 405 of
    # other methods and the route list OpenAPI reads.
    endpoint = PostEvents()
    app.router.routes.append(Route(PATH, endpoint, methods=["POST"], name="post_events"))
    describe_plain_routes(app, documented_routes())
    # Without Redis only requests with an Idempotency-Key are refused: not a reason to leave the balancer.
    app.include_router(ops_router(readiness, gating=frozenset({"kafka"})))
    app.add_middleware(HotRoute, path=PATH, methods=frozenset({"POST"}), endpoint=endpoint)  # innermost
    app.add_middleware(HeaderLimit, max_bytes=settings.max_header_bytes)  # inside metrics: 431s are counted
    app.add_middleware(MetricsMiddleware, service="ingest")
    return app


def app_from_env() -> FastAPI:
    """Entry point for `uvicorn --factory ingest.app:app_from_env`; runs in every worker process."""
    settings = get_settings()
    logs.configure("ingest", level=settings.log_level, fmt=settings.log_format)
    settings.require("kafka_bootstrap", "redis_url", *auth_requires(settings))
    return create_app(settings)
