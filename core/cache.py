"""Redis client factory, and the one key consumers and the query cache share (the cache's I/O lives in `query/`)."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis


def redis_client(url: str, *, max_connections: int = 64) -> Redis:
    """A client whose pool makes a burst wait briefly for a connection instead of failing.

    redis-py's default pool raises at once when all its connections are busy, which the
    query cache would read as "Redis is down" and answer a 200-request burst from
    Postgres. A blocking pool queues the burst (a GET takes microseconds); only a wait
    past `timeout` counts as a failure. Short socket timeouts: a slow or dead Redis must
    degrade to Postgres, not hang a request.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=0.5,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        health_check_interval=10,
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


def version_key(prefix: str, rollup: str) -> str:
    """The counter a consumer bumps after each commit that changed `rollup` (consumers.versions), and
    that the query cache compares an open range's entry against (query.cache_policy)."""
    return f"{prefix}v:{rollup}"


def changes_channel(prefix: str) -> str:
    """Where a consumer publishes the rollups each commit changed, right after bumping their
    versions (consumers.versions); query processes drop their in-process entries of those
    rollups when they hear it (query.local_cache)."""
    return f"{prefix}changed"
