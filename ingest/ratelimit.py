"""Per-key rate limits in events/s: a token bucket in Redis, shared by every worker.

The bucket refills at `rate` tokens/s up to `rate * burst_seconds`; a batch costs
one token per event. The script uses Redis's clock, so workers on machines with
skewed clocks share one truth. If Redis cannot be reached the limit fails open
(counted in a metric): refusing all ingest because a limiter is down would turn a
cache outage into data loss at the producers.

Leases: a round trip to Redis per request was 9 % of an ingest worker's time. So a
request that asks Redis for its tokens also takes a small lease beyond them (at most a
tenth of the bucket, and at most `lease_seconds` of the rate), which this process then
spends without asking, until the lease runs out or is `lease_seconds` old; an expired
lease is dropped, unspent. Leased tokens leave the shared bucket when they are taken, so
every event admitted was paid for: over any interval T the events admitted for a key
are at most capacity + rate * (T + lease_seconds), whatever the number of processes
(rate * lease_seconds more than the bucket alone allows, because a lease taken just
before T may be spent in it). The cost: tokens a process holds are not available to
the others until its lease is spent or expires, so another process may refuse a batch
while such tokens sit in a lease, and `RateLimit-Remaining` is this process's view (the
bucket when it last asked, refilled at the rate since, plus its lease).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core import metrics
from core.problems import TallyError

_BUCKET = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local extra = tonumber(ARGV[4]) or 0
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate / 1000)
local allowed = 0
local granted = 0
if tokens >= cost then
  granted = cost + math.max(0, math.min(extra, math.floor(tokens - cost)))
  tokens = tokens - granted
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return {allowed, tostring(tokens), granted}
"""
LEASE_SHARE = 0.1  # a lease is at most this share of the bucket
_PRUNE_AT = 1024  # leases kept before expired ones are dropped


class RateLimited(TallyError):
    status, title, slug = 429, "Too many events", "rate-limited"


@dataclass(frozen=True, slots=True)
class Quota:
    """What the RateLimit-* headers tell a producer so it can pace itself."""

    limit: int  # bucket size, in events
    remaining: int
    reset_seconds: int  # until the bucket is full again
    rate: int

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset_seconds),
            "RateLimit-Policy": f"{self.limit};w={max(1, round(self.limit / self.rate))}",
        }


@dataclass(slots=True)
class _Lease:
    """Tokens this process took from a key's bucket and has not spent yet, and how many to ask
    for next time: doubled when a lease is spent before it expires, halved when one expires."""

    rate: int
    tokens: int = 0
    expires: float = 0.0  # time.monotonic()
    bucket: float = 0.0  # the bucket's tokens when the lease was taken
    at: float = 0.0
    size: int = 0  # the next lease's size
    asking: bool = False  # a request of this process is taking a lease from Redis now

    def usable(self, rate: int, now: float) -> int:
        return self.tokens if self.rate == rate and now < self.expires else 0

    def quota(self, capacity: int, now: float) -> Quota:
        bucket = min(capacity, self.bucket + (now - self.at) * self.rate)
        return Quota(capacity, int(bucket) + self.tokens, math.ceil((capacity - bucket) / self.rate), self.rate)


class RateLimiter:
    def __init__(
        self, redis: Redis, prefix: str, *, default_rate: int, burst_seconds: float, lease_seconds: float = 0.0
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._default_rate = default_rate
        self._burst = burst_seconds
        self._lease_seconds = lease_seconds
        self._leases: dict[str, _Lease] = {}
        self._script = redis.register_script(_BUCKET)

    def lease_size(self, rate: int, capacity: int) -> int:
        """The largest lease: 0 turns leasing off."""
        return min(math.ceil(rate * self._lease_seconds), math.floor(capacity * LEASE_SHARE))

    async def take(self, key_id: str, events: int, key_rate: int | None) -> Quota | None:
        """Charge `events` to the key's bucket (from this process's lease while it lasts); None when
        unlimited or Redis is down."""
        rate = key_rate or self._default_rate
        if rate <= 0:
            return None
        capacity = max(1, math.ceil(rate * self._burst))
        now = time.monotonic()
        lease = self._leases.get(key_id)
        if lease is None or lease.rate != rate:
            lease = self._leases[key_id] = _Lease(rate)
        held = lease.usable(rate, now)
        if held >= events:  # spent without a round trip
            lease.tokens -= events
            return lease.quota(capacity, now)
        # The lease pays what it can now, before the await, so no concurrent request spends it too.
        # One request at a time takes a new lease; the others meanwhile ask for their own tokens only.
        lease.tokens -= held
        need, extra = events - held, 0
        largest = self.lease_size(rate, capacity)
        leasing = bool(largest) and not lease.asking
        if leasing:
            spent = now < lease.expires  # the last lease ran out before it expired: grow
            extra = min(largest, max(events, lease.size * 2 if spent else lease.size // 2))
            lease.asking = True
        try:
            allowed, left, granted = await self._script(
                keys=[f"{self._prefix}rate:{key_id}"], args=[rate, capacity, need, extra]
            )
        except RedisError:
            metrics.rate_limit_unavailable.inc()
            return None
        finally:
            if leasing:
                lease.asking = False
        tokens = float(left)
        now = time.monotonic()
        if allowed and leasing:
            lease.size = extra
            lease.tokens = int(granted) - need + lease.usable(rate, now)
            lease.expires, lease.bucket, lease.at = now + self._lease_seconds, tokens, now
        if len(self._leases) >= _PRUNE_AT:
            self._leases = {k: v for k, v in self._leases.items() if v.expires > now or v.asking}
        if not allowed and now < lease.expires:
            lease.tokens += held  # refused: the lease keeps what it had for smaller batches
        # What this process could spend now: the bucket and its lease. (Any lease is gone before a
        # Retry-After of 1 s or more is up, so a refusal's wait counts the bucket alone.)
        quota = Quota(capacity, int(tokens) + lease.usable(rate, now), math.ceil((capacity - tokens) / rate), rate)
        if allowed:
            return quota
        if events > capacity:
            raise RateLimited(
                f"a batch of {events} events exceeds this key's burst of {capacity} events; send smaller batches",
                headers={**quota.headers(), "Retry-After": str(math.ceil(capacity / rate))},
            )
        wait = math.ceil((events - tokens) / rate)
        raise RateLimited(
            f"this key may send {rate} events/s (bursts of {capacity}); {events} asked, {quota.remaining} left",
            headers={**quota.headers(), "Retry-After": str(max(1, wait))},
        )
