"""Shared by the coarse-table tests: a coarse table must equal its base table re-bucketed, exactly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

from core.settings import Settings
from schemas.rollups import RollupSpec

_OP = {"count": "sum", "sum": "sum", "min": "min", "max": "max"}


def with_rollups(settings: Settings, tmp: Path, body: str, **overrides: Any) -> Settings:
    """Fresh settings reading the rollups declared in `body` (model_copy would keep loaded rollups)."""
    path = tmp / f"rollups-{abs(hash(body))}.toml"
    path.write_text(body)
    return Settings(**{**settings.model_dump(), "rollups_file": path, **overrides})


async def reset_tables(conn: asyncpg.Connection, topic: str, s: Settings) -> None:
    """Empty every rollup table, the offsets and the claims; the group's partition 0 of `topic` at offset 0."""
    tables = ", ".join(t for spec in s.rollups for t in spec.tables)
    await conn.execute(f"TRUNCATE {tables}, tally_offsets, tally_seen_events")
    await conn.execute(
        "INSERT INTO tally_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, 0, 0)",
        s.consumer_group,
        topic,
    )


async def rebucketed(conn: asyncpg.Connection, spec: RollupSpec, granularity: str) -> list[tuple[Any, ...]]:
    """The base table re-bucketed by SQL: what the `granularity` table must hold."""
    dims = [f'"{c}"' for c in spec.dimension_columns]
    aggs = [f'{_OP[m.op]}("{m.column}")' for m in spec.measures if not m.is_sketch]  # sketches: SQL cannot unite
    keys = ", ".join(["1", *(str(i + 2) for i in range(len(dims)))])
    rows = await conn.fetch(
        f"SELECT date_trunc('{granularity}', bucket, 'UTC'), {', '.join([*dims, *aggs])} "
        f'FROM "{spec.table}" GROUP BY {keys} ORDER BY {keys}'
    )
    return [tuple(r) for r in rows]


async def stored(conn: asyncpg.Connection, spec: RollupSpec, granularity: str) -> list[tuple[Any, ...]]:
    plain = [m.column for m in spec.measures if not m.is_sketch]
    columns = ", ".join(f'"{c}"' for c in ("bucket", *spec.dimension_columns, *plain))
    keys = ", ".join(str(i + 1) for i in range(1 + len(spec.dimension_columns)))
    rows = await conn.fetch(f'SELECT {columns} FROM "{spec.table_for(granularity)}" ORDER BY {keys}')
    return [tuple(r) for r in rows]


async def assert_coarse_exact(settings: Settings, specs: Sequence[RollupSpec] | None = None) -> int:
    """Every coarse table equals its base table re-bucketed (NULL sums/mins/maxes included); returns the rows."""
    conn = await asyncpg.connect(str(settings.postgres_url))
    checked = 0
    try:
        for spec in settings.rollups if specs is None else specs:
            for g in spec.coarse_granularities:
                want, got = await rebucketed(conn, spec, g), await stored(conn, spec, g)
                assert got == want, f"{spec.table_for(g)} differs from {spec.table} re-bucketed"
                checked += len(got)
    finally:
        await conn.close()
    return checked
