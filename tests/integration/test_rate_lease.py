"""Rate-limit leases (ingest.ratelimit) on a real Redis: fewer round trips, and the bound on
what several processes admit together holds.

Each `RateLimiter` here is one process's: its own Redis client and its own leases, on one
key's shared bucket.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from redis.asyncio import Redis

from ingest.ratelimit import RateLimited, RateLimiter
from tests.servers import Servers

pytestmark = pytest.mark.integration


async def _script_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))


async def test_a_lease_saves_round_trips_and_the_headers_stay_right(servers: Servers) -> None:
    redis = Redis.from_url(servers.redis_url)
    prefix = f"lease-{uuid.uuid4().hex[:8]}:"
    limiter = RateLimiter(redis, prefix, default_rate=100_000, burst_seconds=2.0, lease_seconds=0.25)
    try:
        before = await _script_calls(redis)
        started = time.monotonic()
        quotas = [await limiter.take("k", 100, None) for _ in range(200)]
        elapsed = time.monotonic() - started
        calls = await _script_calls(redis) - before
    finally:
        await redis.aclose()
    # Leases start at one request's worth and double while each is spent before it expires
    # (100, 200, 400, ... up to min(0.25 s of 100k/s, a tenth of the 200k bucket) = 20,000):
    # 200 requests of 100 events take 8 round trips, a few more if leases expire on a slow machine.
    assert 8 <= calls <= 12, calls
    assert all(q is not None and q.limit == 200_000 for q in quotas)
    remaining = [q.remaining for q in quotas if q is not None]
    assert remaining[0] == 199_900  # the bucket and the lease: 200,000 - 100 spent
    # Remaining is the bucket (refilled at the rate since it was read) plus the unspent lease:
    # 200,000 - 20,000 spent, plus what refilled meanwhile (Redis's clock and ours differ by
    # a little: 10 ms of slack, 1,000 tokens).
    assert 180_000 - 1 <= remaining[-1] <= min(200_000, 180_000 + 100_000 * (elapsed + 0.01)), (remaining[-1], elapsed)


async def test_leasing_off_asks_redis_per_request(servers: Servers) -> None:
    redis = Redis.from_url(servers.redis_url)
    limiter = RateLimiter(redis, f"nolease-{uuid.uuid4().hex[:8]}:", default_rate=100_000, burst_seconds=2.0)
    try:
        before = await _script_calls(redis)
        for _ in range(20):
            await limiter.take("k", 100, None)
        assert await _script_calls(redis) - before == 20
    finally:
        await redis.aclose()


async def test_an_expired_lease_is_not_spent(servers: Servers) -> None:
    redis = Redis.from_url(servers.redis_url)
    limiter = RateLimiter(redis, f"expire-{uuid.uuid4().hex[:8]}:", default_rate=1_000, burst_seconds=1.0,
                          lease_seconds=0.2)
    try:
        first = await limiter.take("k", 10, None)  # leases min(200, 100) = 100 beyond its 10
        assert first is not None and first.remaining == 990
        before = await _script_calls(redis)
        await limiter.take("k", 10, None)
        assert await _script_calls(redis) == before  # from the lease
        await asyncio.sleep(0.3)
        await limiter.take("k", 10, None)
        assert await _script_calls(redis) == before + 1  # the lease expired: Redis again
    finally:
        await redis.aclose()


@pytest.mark.parametrize("lease_seconds", [0.0, 0.25])
async def test_processes_together_admit_no_more_than_the_bound(servers: Servers, lease_seconds: float) -> None:
    """4 processes hammer one key for 2 s: admitted <= capacity + rate * (T + lease), and the
    leases cost at most a lease per process below what the bucket alone would admit."""
    rate, burst, processes, seconds, batch = 2_000, 1.0, 4, 2.0, 20
    clients = [Redis.from_url(servers.redis_url) for _ in range(processes)]
    prefix = f"bound-{uuid.uuid4().hex[:8]}:"
    limiters = [RateLimiter(c, prefix, default_rate=rate, burst_seconds=burst, lease_seconds=lease_seconds)
                for c in clients]
    admitted = 0
    start = time.monotonic()

    async def producer(limiter: RateLimiter) -> None:
        nonlocal admitted
        while time.monotonic() - start < seconds:
            try:
                await limiter.take("shared", batch, None)
                admitted += batch
            except RateLimited:
                await asyncio.sleep(0.005)

    try:
        await asyncio.gather(*(producer(limiter) for limiter in limiters for _ in range(2)))
    finally:
        for c in clients:
            await c.aclose()
    elapsed = time.monotonic() - start
    capacity = rate * burst
    lease = limiters[0].lease_size(rate, int(capacity))
    assert lease == (0 if lease_seconds == 0 else 200)
    upper = capacity + rate * (elapsed + lease_seconds)
    lower = capacity + rate * seconds - processes * (lease + batch) - rate * 0.1  # leases unspent, polling
    print(f"lease {lease_seconds}s: admitted {admitted} in {elapsed:.2f} s; bounds [{lower:.0f}, {upper:.0f}]")
    assert lower <= admitted <= upper


async def test_an_empty_batch_does_not_stop_leasing(servers: Servers) -> None:
    """A batch of 0 events asks Redis for nothing more; the next one still takes a lease."""
    redis = Redis.from_url(servers.redis_url)
    limiter = RateLimiter(redis, f"empty-{uuid.uuid4().hex[:8]}:", default_rate=1_000, burst_seconds=1.0,
                          lease_seconds=0.25)
    try:
        await limiter.take("k", 0, None)
        await limiter.take("k", 10, None)  # leases 10 beyond its own 10
        before = await _script_calls(redis)
        await limiter.take("k", 10, None)
        assert await _script_calls(redis) == before  # spent from the lease
    finally:
        await redis.aclose()
