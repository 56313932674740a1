"""Bounded pools and a bounded number of requests in flight: the excess is a fast 503, never a queue.

A query that cannot get a database connection within TALLY_DB_POOL_TIMEOUT_SECONDS is a 503
with Retry-After; a request that arrives while TALLY_QUERY_MAX_INFLIGHT are being served is
refused at once, while the ops routes still answer. Real Postgres and Redis; the pool's only
connection is held by the test through the service's own engine.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from core.settings import Settings
from tests.integration.query_support import WHOLE, insert_rows, make_rows, running, sample

pytestmark = pytest.mark.integration

PATH = "/v1/rollups/events_by_type"
NO_CACHE = {"cache-control": "no-cache"}


async def test_no_connection_within_the_pool_timeout_is_a_fast_503(migrated: Settings) -> None:
    settings = migrated.model_copy(update={"db_pool_size": 1, "db_pool_timeout_seconds": 0.3})
    await insert_rows(settings, make_rows(n=20))
    async with running(settings) as (http, st):
        assert (await http.get(PATH, params=WHOLE, headers=NO_CACHE)).status_code == 200  # the control
        async with st["engine"].connect() as held:  # the pool's one connection
            await held.exec_driver_sql("SELECT 1")
            started = time.perf_counter()
            refused = await http.get(PATH, params=WHOLE, headers=NO_CACHE)
            waited = time.perf_counter() - started
        again = await http.get(PATH, params=WHOLE, headers=NO_CACHE)
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["detail"] == "the database is unreachable or saturated"
    assert 0.3 <= waited < 2.0  # the pool timeout, not the statement deadline (5 s and more)
    assert again.status_code == 200  # the connection is back: served again


async def test_requests_beyond_the_inflight_cap_are_refused_at_once(migrated: Settings) -> None:
    settings = migrated.model_copy(
        update={"db_pool_size": 1, "db_pool_timeout_seconds": 3.0, "query_max_inflight": 1}
    )
    await insert_rows(settings, make_rows(n=20))
    shed_before = sample("tally_http_shed_total", {"service": "query"})
    async with running(settings) as (http, st):
        async with st["engine"].connect() as held:
            await held.exec_driver_sql("SELECT 1")
            first = asyncio.create_task(http.get(PATH, params=WHOLE, headers=NO_CACHE))  # waits for the pool
            await asyncio.sleep(0.3)
            started = time.perf_counter()
            second = await http.get(PATH, params=WHOLE, headers=NO_CACHE)
            refused_in = time.perf_counter() - started
            health = await http.get("/healthz")
            assert not first.done()
        served = await first  # the connection came back within the pool timeout
    assert second.status_code == 503, second.text
    assert second.headers["retry-after"] == "1"
    assert "TALLY_QUERY_MAX_INFLIGHT" in second.json()["detail"]
    assert refused_in < 0.5
    assert health.status_code == 200
    assert served.status_code == 200
    assert sample("tally_http_shed_total", {"service": "query"}) == shed_before + 1


def test_pool_settings_are_bounded() -> None:
    for bad in ({"db_pool_size": 0}, {"db_max_overflow": -1}, {"db_pool_timeout_seconds": 0},
                {"redis_pool_size": 0}, {"query_max_inflight": 0}, {"db_pool_size": 501}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Settings(env="test", **bad)
