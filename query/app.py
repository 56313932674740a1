"""The query service's app factory. Nothing connects at import time; the lifespan owns every client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from starlette.routing import Route

from core import logs
from core.auth import auth_responses, open_key_store, require_scope
from core.cache import redis_client
from core.db import read_engine
from core.health import postgres_ok, redis_ok
from core.http import (
    HeaderLimit,
    HotRoute,
    InflightLimit,
    MetricsMiddleware,
    describe_plain_routes,
    drain_on_sigterm,
    ops_router,
)
from core.looplag import LoopLagMonitor, settle_heap
from core.problems import install_problem_handlers
from core.redis_read import RedisReader
from core.settings import Settings, get_settings
from query.cache import QueryCache
from query.catalog import Catalog
from query.console import CONSOLE_PAGES, mount_console
from query.counters import CounterScraper
from query.endpoint import PATH, GetRollup
from query.export import ExportGate
from query.keys import Resolver
from query.lag import LagProbe
from query.lag_sampler import LagSampler
from query.local_cache import LocalTier, subscriber
from query.openapi import documented_routes
from query.params import Limits
from query.routes import router
from query.state import QueryState, state

REQUIRED = ("postgres_url", "redis_url", "kafka_bootstrap")


async def readiness(request: Request) -> dict[str, bool]:
    st = state(request)
    postgres, redis, kafka = await asyncio.gather(
        postgres_ok(st["engine"]), redis_ok(st["redis"]), st["lag"].kafka_ok()
    )
    return {"postgres": postgres, "redis": redis, "kafka": kafka}


def create_app(settings: Settings) -> FastAPI:
    settings.require(*REQUIRED)
    settings.require_secrets()
    catalog = Catalog(settings.rollups)  # a broken rollups file fails here, before serving
    limits = Limits(
        default_limit=settings.default_limit,
        max_limit=settings.max_limit,
        max_offset=settings.max_offset,
        max_buckets=settings.max_buckets,
        max_export_rows=settings.max_export_rows,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[QueryState]:
        engine = read_engine(
            str(settings.postgres_url),
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout=settings.db_pool_timeout_seconds,
            statement_timeout_ms=settings.statement_timeout_ms,
        )
        redis = redis_client(str(settings.redis_url), max_connections=settings.redis_pool_size)
        lag = LagProbe(settings, engine)
        sampler = LagSampler(lag, settings)
        counters = CounterScraper(settings.metrics_target_urls)
        keys = open_key_store(settings, app="tally-query")  # its own small pool: auth never waits on queries
        # A lock outlives the slowest query, so a crashed holder delays others by at most that.
        reader = RedisReader.from_url(str(settings.redis_url))
        local = (
            LocalTier(
                subscriber(str(settings.redis_url)),
                settings.cache_prefix,
                max_bytes=settings.query_local_cache_mb << 20,
            )
            if settings.query_local_cache_mb
            else None
        )
        cache = QueryCache(redis, lock_ttl_ms=settings.statement_timeout_ms + 2_000, reader=reader, local=local)
        drain_on_sigterm(app, settings.drain_seconds)
        loop_lag = LoopLagMonitor("query")
        loop_lag.start()
        try:
            await lag.start()
            sampler.start()
            if local is not None:
                local.start()
            settle_heap()  # the collector's full passes, rare and over what requests made only
            yield QueryState(
                settings=settings,
                engine=engine,
                redis=redis,
                cache=cache,
                catalog=catalog,
                limits=limits,
                resolver=Resolver(catalog, limits, prefix=settings.cache_prefix, secret=settings.cursor_secret),
                exports=ExportGate(settings.max_exports),
                lag=lag,
                lag_sampler=sampler,
                counters=counters,
                keys=keys,
            )
        finally:
            try:
                await loop_lag.stop()
                await sampler.stop()
                await cache.drain()
                await lag.close()
                await counters.close()
            finally:
                if local is not None:
                    await local.stop()
                await reader.close()
                await redis.aclose()
                await engine.dispose()
                if keys is not None:
                    await keys.close()

    app = FastAPI(
        title="Tally query API",
        version="0.1.0",
        description="Rollup queries with column selection, keyset pagination and a Redis "
        "stale-while-revalidate cache; consumer lag for operators.",
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry hooks: Tally's telemetry is Prometheus (core.metrics), and
        # asking on every request whether a tracer is configured cost ~3 % of a cache hit.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_problem_handlers(app)
    # The dashboards' hot route, straight to its endpoint (innermost: the limits below wrap it).
    endpoint = GetRollup()
    app.add_middleware(HotRoute, path=PATH, methods=frozenset({"GET", "HEAD"}), endpoint=endpoint)
    app.add_middleware(InflightLimit, service="query", limit=settings.query_max_inflight)
    app.add_middleware(HeaderLimit, max_bytes=settings.max_header_bytes)  # inside metrics: 431s are counted
    app.add_middleware(MetricsMiddleware, service="query", pages=CONSOLE_PAGES)
    # Rollups and lag need a `query` key; /healthz, /readyz and /metrics (ops_router) stay open.
    app.include_router(router, dependencies=[Depends(require_scope("query"))], responses=auth_responses("query"))
    # The hot route authenticates for the `query` scope itself. Mounted too, behind HotRoute: for the
    # 405 of other methods; OpenAPI describes it from query.openapi.
    app.router.routes.append(Route(PATH, endpoint, methods=["GET"], name="query_rollup"))
    describe_plain_routes(app, documented_routes())
    # Queries answer without Redis (bypass) and without Kafka (only lag needs it).
    app.include_router(ops_router(readiness, gating=frozenset({"postgres"})))
    mount_console(app)  # static files only: its data comes from the routes above, with the user's key
    return app


def app_from_env() -> FastAPI:
    """Entry point for `uvicorn --factory query.app:app_from_env` (what `tally query` runs)."""
    settings = get_settings()
    logs.configure("query", level=settings.log_level, fmt=settings.log_format)
    settings.require(*REQUIRED)
    return create_app(settings)
