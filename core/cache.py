"""Redis client factory (the query cache's I/O lives in `query/`)."""

from __future__ import annotations

from redis.asyncio import Redis


def redis_client(url: str) -> Redis:
    # Short timeouts: a slow or dead Redis must degrade to Postgres, not hang a request.
    return Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5, health_check_interval=10)
