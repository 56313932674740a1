"""Stored offsets: the positions in `tally_offsets` that a consumer seeks to on assignment.

They live in Postgres, not in Kafka, because they must commit in the same
transaction as the rollup rows they account for.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable

from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.batch import TP
from consumers.retry import postgres_transient, retrying
from consumers.sql import ENSURE_OFFSETS, READ_OFFSETS


async def read_offsets(engine: AsyncEngine, group_id: str, tps: Iterable[TP]) -> dict[TP, int]:
    """Stored next offsets of `tps`, creating a row at 0 for a partition seen for the first time.

    0 means "from the start": if the log starts later, Kafka resets to the
    earliest offset and the first batch's conditional update still matches 0.
    """
    by_topic: dict[str, list[int]] = defaultdict(list)
    for topic, partition in tps:
        by_topic[topic].append(partition)
    out: dict[TP, int] = {}
    async with engine.begin() as conn:
        for topic, partitions in sorted(by_topic.items()):
            params = {"group_id": group_id, "topic": topic, "partitions": sorted(partitions)}
            await conn.execute(ENSURE_OFFSETS, params)
            for partition, next_offset in (await conn.execute(READ_OFFSETS, params)).all():
                out[(topic, int(partition))] = int(next_offset)
    return out


async def load_offsets(
    engine: AsyncEngine, group_id: str, tps: Iterable[TP], *, stop: asyncio.Event | None = None
) -> dict[TP, int]:
    """`read_offsets`, retried until Postgres answers (or a stop gives up with `Stopped`)."""
    wanted = list(tps)
    return await retrying(
        lambda: read_offsets(engine, group_id, wanted), what="load offsets", transient=postgres_transient, stop=stop
    )
