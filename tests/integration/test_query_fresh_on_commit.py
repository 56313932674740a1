"""Cached dashboards follow commits: a consumer's commit moves its rollups' versions in Redis, and
an open range cached before it is refreshed once, then shows the new events (issue 18, item 3).

Real Kafka-protocol broker, Postgres and Redis; the consumer and the query app run in-process.
The timer is set long (60 s) so that only a version move can make the new events visible in time.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from redis.asyncio import Redis

from core.cache import version_key
from core.settings import Settings
from schemas.envelope import pack
from schemas.events import EventLimits, normalize_event
from tests.integration.consumer_helpers import consumer_settings, now_ms, produce, wait_for_offsets
from tests.integration.consumer_helpers import running as consuming
from tests.integration.query_support import running as querying

PATH = "/v1/rollups/events_by_type"
ASKED = {"from": "-1h", "granularity": "hour", "fields": "type,count", "filter[type]": "fresh_probe"}


def envelope(n: int) -> bytes:
    received = now_ms()
    events = [normalize_event({"type": "fresh_probe", "ts": received}, received, EventLimits()) for _ in range(n)]
    return next(pack(events, 1 << 30))


async def counted(http: httpx.AsyncClient) -> tuple[int, str]:
    response = await http.get(PATH, params=ASKED)
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return (data[0]["count"] if data else 0), response.headers["x-cache"]


async def test_a_cached_open_range_shows_a_commit_within_one_refresh(migrated: Settings) -> None:
    settings = consumer_settings(
        migrated,
        cache_fresh_seconds=60.0,  # the timer alone would hide the second commit for a minute
        cache_stale_seconds=60.0,
        cache_versioned_fresh_seconds=60.0,
        cache_refresh_seconds=0.2,
    )
    redis = Redis.from_url(str(settings.redis_url))
    try:
        async with consuming(settings) as (_, consumer), querying(settings) as (http, _):
            await wait_for_offsets(settings, await produce(settings, [(0, envelope(2))]), [consumer])
            await asyncio.sleep(0.3)  # the first commit's bump
            first = await redis.get(version_key(settings.cache_prefix, "events_by_type"))
            assert first is not None and int(first) >= 1
            assert await counted(http) == (2, "miss")
            assert await counted(http) == (2, "hit")

            await wait_for_offsets(settings, await produce(settings, [(1, envelope(3))]), [consumer])
            seen: list[tuple[int, str]] = []
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                seen.append(await counted(http))
                if seen[-1][0] == 5:
                    break
                await asyncio.sleep(0.05)
            assert seen[-1] == (5, "hit"), seen  # from the cache, refreshed once: not a miss, not Postgres
            assert {cache for _, cache in seen} <= {"hit", "stale"}, seen
            assert seen.count((2, "stale")) >= 1, seen  # the old entry was served while it was refreshed
            later = await redis.get(version_key(settings.cache_prefix, "events_by_type"))
            assert later is not None and int(later) > int(first)
            # page_views (type = page_view) saw no commit: its version never moved
            assert await redis.get(version_key(settings.cache_prefix, "page_views")) is None
    finally:
        await redis.aclose()


async def test_a_closed_range_ignores_versions(migrated: Settings) -> None:
    """A range that ended before the lateness window cannot change: a version move does not refresh
    it, while the same move makes an open range's entry stale. The Redis tier's rule: the in-process
    tier is off, as it would answer both from memory until an announcement."""
    settings = consumer_settings(migrated, cache_refresh_seconds=0.0, query_local_cache_mb=0)
    closed = {"from": "2026-01-01T00:00:00Z", "to": "2026-01-02T00:00:00Z", "granularity": "day"}
    key = version_key(settings.cache_prefix, "events_by_type")
    redis = Redis.from_url(str(settings.redis_url))
    try:
        async with querying(settings) as (http, _):
            await redis.incr(key)  # both entries are computed at a known version
            assert (await http.get(PATH, params=closed)).headers["x-cache"] == "miss"
            assert (await http.get(PATH, params=ASKED)).headers["x-cache"] == "miss"
            await redis.incr(key)
            assert (await http.get(PATH, params=closed)).headers["x-cache"] == "hit"
            assert (await http.get(PATH, params=ASKED)).headers["x-cache"] == "stale"
    finally:
        await redis.aclose()
