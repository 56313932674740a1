"""Per-key rate limits in events/s: a token bucket in Redis, shared by every worker.

The bucket refills at `rate` tokens/s up to `rate * burst_seconds`; a batch costs
one token per event. The script uses Redis's clock, so workers on machines with
skewed clocks share one truth. If Redis cannot be reached the limit fails open
(counted in a metric): refusing all ingest because a limiter is down would turn a
cache outage into data loss at the producers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core import metrics
from core.problems import TallyError

_BUCKET = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate / 1000)
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return {allowed, tostring(tokens)}
"""


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


class RateLimiter:
    def __init__(self, redis: Redis, prefix: str, *, default_rate: int, burst_seconds: float) -> None:
        self._redis = redis
        self._prefix = prefix
        self._default_rate = default_rate
        self._burst = burst_seconds
        self._script = redis.register_script(_BUCKET)

    async def take(self, key_id: str, events: int, key_rate: int | None) -> Quota | None:
        """Charge `events` to the key's bucket; None when unlimited or Redis is down."""
        rate = key_rate or self._default_rate
        if rate <= 0:
            return None
        capacity = max(1, math.ceil(rate * self._burst))
        try:
            allowed, left = await self._script(keys=[f"{self._prefix}rate:{key_id}"], args=[rate, capacity, events])
        except RedisError:
            metrics.rate_limit_unavailable.inc()
            return None
        tokens = float(left)
        quota = Quota(capacity, int(tokens), math.ceil((capacity - tokens) / rate), rate)
        if allowed:
            return quota
        metrics.rate_limited_events.inc(events)
        if events > capacity:
            raise RateLimited(
                f"a batch of {events} events exceeds this key's burst of {capacity} events; send smaller batches",
                headers={**quota.headers(), "Retry-After": str(math.ceil(capacity / rate))},
            )
        wait = math.ceil((events - tokens) / rate)
        raise RateLimited(
            f"this key may send {rate} events/s (bursts of {capacity}); {events} asked, {int(tokens)} left",
            headers={**quota.headers(), "Retry-After": str(max(1, wait))},
        )
