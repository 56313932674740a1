"""Readiness probes: each answers within a bound and never raises."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

PROBE_TIMEOUT = 1.0


async def postgres_ok(engine: AsyncEngine) -> bool:
    async def probe() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    with contextlib.suppress(Exception):
        await asyncio.wait_for(probe(), PROBE_TIMEOUT)
        return True
    return False


async def redis_ok(client: Redis) -> bool:
    with contextlib.suppress(Exception):
        return bool(await asyncio.wait_for(client.ping(), PROBE_TIMEOUT))
    return False


async def kafka_ok(client: Any) -> bool:
    """`client` is an aiokafka AIOKafkaClient (`producer.client`, `consumer._client`)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.fetch_all_metadata(), PROBE_TIMEOUT)
        return True
    return False
