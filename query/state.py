"""The typed lifespan state every request of the query app sees."""

from __future__ import annotations

from typing import TypedDict, cast

from redis.asyncio import Redis
from starlette.requests import Request

from core.auth import KeyStore
from core.db import ReadEngine
from core.settings import Settings
from query.cache import QueryCache
from query.catalog import Catalog
from query.counters import CounterScraper
from query.export import ExportGate
from query.keys import Resolver
from query.lag import LagProbe
from query.lag_sampler import LagSampler
from query.params import Limits


class QueryState(TypedDict):
    settings: Settings
    engine: ReadEngine
    redis: Redis
    cache: QueryCache
    catalog: Catalog
    limits: Limits
    resolver: Resolver
    exports: ExportGate
    lag: LagProbe
    lag_sampler: LagSampler
    counters: CounterScraper
    keys: KeyStore | None  # for `require_scope`; None when auth is off


def state(request: Request) -> QueryState:
    """The lifespan state (Starlette copies it into each request scope)."""
    return cast(QueryState, request.scope["state"])
