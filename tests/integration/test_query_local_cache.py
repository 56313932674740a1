"""The in-process tier of the query cache (query.local_cache) against a real Redis and Postgres:
a fresh hit makes no round trip, a commit's announcement drops it at once, and a lost
subscription stops it until it is back."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from consumers.versions import VersionBumper
from core import devstack
from core.settings import Settings
from query.local_cache import LocalTier
from query.state import QueryState
from tests.integration.query_support import running

PATH = "/v1/rollups/events_by_type"
OPEN = {"from": "-1h", "granularity": "hour", "fields": "type,count"}


async def until(check: object, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


async def listening(state: QueryState) -> LocalTier:
    """The app's in-process tier, once its subscription is up."""
    local = state["cache"].local
    assert isinstance(local, LocalTier)
    await until(lambda: local.listening)
    return local


async def test_fresh_hits_skip_redis_until_a_commit_is_announced(migrated: Settings) -> None:
    redis = Redis.from_url(str(migrated.redis_url))
    try:
        async with running(migrated) as (http, state):
            local = await listening(state)
            await redis.incr(f"{migrated.cache_prefix}v:events_by_type")  # a consumer has bumped once
            assert (await http.get(PATH, params=OPEN)).headers["x-cache"] == "miss"
            assert local.stats()[0] == 1  # computed fresh: kept here too

            await redis.execute_command("CLIENT", "PAUSE", "800", "ALL")
            started = time.monotonic()
            r = await http.get(PATH, params=OPEN)
            assert r.headers["x-cache"] == "hit" and time.monotonic() - started < 0.3  # not from Redis
            await asyncio.sleep(0.9)

            bumper = VersionBumper(Redis.from_url(str(migrated.redis_url)), migrated.cache_prefix)
            bumper.committed(["events_by_type"])
            await bumper.close()
            await until(lambda: local.stats()[0] == 0)  # the announcement dropped it
            await redis.execute_command("CLIENT", "PAUSE", "800", "ALL")
            r = await http.get(PATH, params=OPEN)
            assert r.headers["x-cache"] == "bypass"  # it had to ask Redis (paused): answered from Postgres
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
        await redis.aclose()


async def test_a_lost_subscription_empties_the_tier_until_it_is_back(migrated: Settings) -> None:
    redis = Redis.from_url(str(migrated.redis_url))
    try:
        async with running(migrated) as (http, state):
            local = await listening(state)
            await redis.incr(f"{migrated.cache_prefix}v:events_by_type")  # entries follow commits
            await http.get(PATH, params=OPEN)
            assert local.stats()[0] == 1
            await redis.client_kill_filter(_type="pubsub")
            await until(lambda: not local.listening or local.stats()[0] == 0)
            assert local.stats()[0] == 0
            await until(lambda: local.listening, seconds=10)  # resubscribed
            assert (await http.get(PATH, params=OPEN)).headers["x-cache"] == "hit"  # from Redis, kept again
            assert local.stats()[0] == 1
    finally:
        await redis.aclose()


async def test_with_redis_down_closed_ranges_are_still_served_from_the_process(migrated: Settings) -> None:
    closed = {"from": "2026-03-01T00:00:00Z", "to": "2026-03-02T00:00:00Z", "granularity": "day", "fields": "count"}
    redis = devstack.redis(devstack.free_port()).start()
    try:
        async with running(migrated.model_copy(update={"redis_url": redis.url})) as (http, state):
            local = await listening(state)
            versions = Redis.from_url(redis.url)
            await versions.incr(f"{migrated.cache_prefix}v:events_by_type")
            await versions.aclose()
            assert (await http.get(PATH, params=closed)).headers["x-cache"] == "miss"
            assert (await http.get(PATH, params=OPEN)).headers["x-cache"] == "miss"
            redis.kill()
            await until(lambda: not local.listening)
            assert (await http.get(PATH, params=closed)).headers["x-cache"] == "hit"  # from memory
            assert (await http.get(PATH, params=OPEN)).headers["x-cache"] == "bypass"  # from Postgres
    finally:
        redis.stop()
