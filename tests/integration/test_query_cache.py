"""The query cache on real Redis: hit/miss/stale/bypass, validators, single flight."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from core import devstack
from core.settings import Settings
from query.app import create_app
from tests.conftest import serve
from tests.integration.query_support import WHOLE, Row, exact, query_api, sample, stored

pytestmark = pytest.mark.integration

PATH = "/v1/rollups/events_by_type"
PARAMS = {**WHOLE, "granularity": "hour", "fields": "bucket,type,count,sum_properties_amount"}


def computations(reason: str) -> float:
    return sample("tally_query_computations_total", {"rollup": "events_by_type", "reason": reason})


async def test_miss_then_hit_with_identical_bytes(loaded: tuple[Settings, list[Row]]) -> None:
    settings, _ = loaded
    async with query_api(settings) as http:
        first = await http.get(PATH, params=PARAMS)
        second = await http.get(PATH, params=PARAMS)
        other_format = await http.get(PATH, params={**PARAMS, "format": "columns"})
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert stored(second) == stored(first)  # the stored bytes, served without re-rendering
    assert exact(first)["meta"]["cache"] == "miss" and exact(second)["meta"]["cache"] == "hit"
    assert exact(second)["meta"]["query_ms"] == exact(first)["meta"]["query_ms"]  # the computation's, kept
    assert second.headers["etag"] == first.headers["etag"]
    assert int(first.headers["age"]) == 0 and int(second.headers["age"]) >= 0
    assert other_format.headers["x-cache"] == "miss"  # the format is part of the key
    # A range that ended before the lateness window is immutable: cached long.
    assert second.headers["cache-control"].startswith("private, max-age=") and int(
        second.headers["cache-control"].rsplit("=", 1)[1]) > 3_000


async def test_etag_and_no_cache(loaded: tuple[Settings, list[Row]]) -> None:
    settings, _ = loaded
    async with query_api(settings) as http:
        first = await http.get(PATH, params=PARAMS)
        not_modified = await http.get(PATH, params=PARAMS, headers={"If-None-Match": first.headers["etag"]})
        changed = await http.get(PATH, params=PARAMS, headers={"If-None-Match": '"something-else"'})
        before = computations("miss")
        forced = await http.get(PATH, params=PARAMS, headers={"Cache-Control": "no-cache"})
        after = computations("miss")
        then = await http.get(PATH, params=PARAMS)
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert not_modified.headers["etag"] == first.headers["etag"]
    assert not_modified.headers["x-cache"] == "hit" and "age" in not_modified.headers
    assert changed.status_code == 200 and stored(changed) == stored(first)
    assert forced.status_code == 200 and forced.headers["x-cache"] == "miss"
    assert after - before == 1
    assert exact(forced)["data"] == exact(first)["data"]
    assert then.headers["x-cache"] == "hit" and stored(then) == stored(forced)  # the forced read was stored


async def test_stale_is_served_and_refreshed_once(loaded: tuple[Settings, list[Row]]) -> None:
    settings, _ = loaded
    # An open range (lateness larger than the data's age), fresh for 1 s then stale for 30 s.
    open_range = settings.model_copy(update={"lateness_seconds": 10**9, "cache_fresh_seconds": 1.0,
                                             "cache_stale_seconds": 30.0})
    async with query_api(open_range) as http:
        first = await http.get(PATH, params=PARAMS)
        assert first.headers["x-cache"] == "miss"
        assert first.headers["cache-control"] in ("private, max-age=0", "private, max-age=1")  # open: brief
        await asyncio.sleep(1.2)
        refreshes = sample("tally_query_cache_refreshes_total", {})
        refresh_runs = computations("refresh")
        stale = await asyncio.gather(*(http.get(PATH, params=PARAMS) for _ in range(10)))
        # Stale answers come at once, as stored; requests that land after the refresh are hits.
        outcomes = [r.headers["x-cache"] for r in stale]
        assert set(outcomes) <= {"stale", "hit"} and outcomes.count("stale") >= 1
        assert all(stored(r) == stored(first) and int(r.headers["age"]) >= 1
                   for r in stale if r.headers["x-cache"] == "stale")
        deadline = time.monotonic() + 10
        while sample("tally_query_cache_refreshes_total", {}) == refreshes and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        fresh = await http.get(PATH, params=PARAMS)
    assert sample("tally_query_cache_refreshes_total", {}) - refreshes == 1
    assert computations("refresh") - refresh_runs == 1  # ten stale hits, one refresh
    assert fresh.headers["x-cache"] == "hit" and int(fresh.headers["age"]) == 0
    assert exact(fresh)["data"] == exact(first)["data"]


async def test_concurrent_cold_requests_compute_once(loaded: tuple[Settings, list[Row]]) -> None:
    settings, _ = loaded
    before, misses = computations("miss"), sample("tally_query_cache_total", {"outcome": "miss"})
    async with query_api(settings) as http:
        responses = await asyncio.gather(*(http.get(PATH, params=PARAMS) for _ in range(50)))
    assert {r.status_code for r in responses} == {200}
    assert len({stored(r) for r in responses}) == 1
    assert {r.headers["x-cache"] for r in responses} <= {"miss", "hit"}
    assert computations("miss") - before == 1
    assert sample("tally_query_cache_total", {"outcome": "miss"}) - misses == 1


async def test_two_processes_share_one_computation(loaded: tuple[Settings, list[Row]]) -> None:
    """Two app instances (as two replicas would be) elect one computer with the Redis lock."""
    settings, _ = loaded
    before = computations("miss")
    async with serve(create_app(settings)) as a, serve(create_app(settings)) as b, \
            httpx.AsyncClient(timeout=30) as http:
        params = {**PARAMS, "fields": "type,count"}
        responses = await asyncio.gather(*(http.get(f"{url}{PATH}", params=params) for url in [a, b] * 20))
    assert len({stored(r) for r in responses}) == 1
    assert computations("miss") - before == 1


async def test_redis_down_answers_from_postgres(loaded: tuple[Settings, list[Row]]) -> None:
    settings, _ = loaded
    healthy = loaded[0]
    dead = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{devstack.free_port()}/0"})
    async with query_api(healthy) as http:
        reference = exact(await http.get(PATH, params=PARAMS))
    async with query_api(dead) as http:
        started = time.monotonic()
        first = await http.get(PATH, params=PARAMS)
        second = await http.get(PATH, params=PARAMS)
        elapsed = time.monotonic() - started
        ready = await http.get("/readyz")
    for response in (first, second):
        assert response.status_code == 200
        assert response.headers["x-cache"] == "bypass"
        assert exact(response)["data"] == reference["data"]
        assert response.headers["age"] == "0" and response.headers["etag"]
    assert elapsed < 5
    # Queries still answer, so the replica stays ready and reports Redis as degraded.
    assert ready.status_code == 200 and ready.json()["checks"]["redis"] is False
    assert ready.json()["degraded"] == ["redis"]
    assert ready.json()["checks"]["postgres"] is True
