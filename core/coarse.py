"""(Re)building a rollup's coarser tables (`agg_<name>__hour`, `__day`) from its base table.

The consumer keeps every stored granularity exact at each commit (consumers.aggregate
derives the coarse cells from the base cells of a batch). This module is for when
the base table holds rows the coarse tables do not: `tally migrate` adding a
granularity to a populated rollup, and tests or benchmarks that seed a base table
directly. Re-bucketing is exact for every measure: count and sum add, min and max
take the least and greatest, and SQL's aggregates skip NULLs (all NULL stays NULL),
which is the consumer's merge.

The statements run in the caller's transaction, which first takes `SHARE` on the
base table: it conflicts with the consumers' `ROW EXCLUSIVE` (their upserts), so a
consumer commit is either wholly before the fill (its base rows are counted by it)
or waits until the fill commits (then its own upsert adds its cells to both). None
is counted twice or missed. Readers (MVCC) are never blocked: the coarse table is
emptied with DELETE, not TRUNCATE, so a query sees the old rows until commit.

Sketch measures cannot be united in SQL (no extension is assumed), so their columns
are filled after the other measures, in the same transaction: each coarse row's
sketches gathered by SQL (`array_agg`) and united here (schemas.sketches).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from core.db import asyncpg_url
from schemas import sketches
from schemas.rollups import RollupSpec

_MERGE = {"count": "sum", "sum": "sum", "min": "min", "max": "max"}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def fill_statements(spec: RollupSpec, granularities: Sequence[str] | None = None) -> list[str]:
    """The SQL that locks the base table and rebuilds the given coarse tables (default: all of them).

    Each coarse table is rebuilt from the next finer stored table, already exact at
    that point of the transaction: a day table from the hour table reads 60x fewer
    rows than from the minute table, with the same result.
    """
    wanted = spec.coarse_granularities if granularities is None else tuple(granularities)
    unknown = [g for g in wanted if g not in spec.coarse_granularities]
    if unknown:
        raise ValueError(f"rollup {spec.name} has no coarse granularity {', '.join(unknown)}")
    if not wanted:
        return []
    dims = [_quote(c) for c in spec.dimension_columns]
    measures = [(_quote(m.column), m.op) for m in spec.measures if not m.is_sketch]  # sketches: `_unite_sketches`
    columns = ", ".join(["bucket", *dims, *(c for c, _ in measures)])
    statements = [f"LOCK TABLE {_quote(spec.table)} IN SHARE MODE"]
    source = spec.table
    for g in spec.coarse_granularities:  # ascending, so each one's source is already rebuilt
        target = spec.table_for(g)
        if g in wanted:
            aggregates = [
                f"CAST({_MERGE[op]}({c}) AS bigint)" if op == "count" else f"{_MERGE[op]}({c})" for c, op in measures
            ]
            group = ", ".join(["1", *(str(i + 2) for i in range(len(dims)))])
            # Identifiers come from validated specs and are quoted; the granularity is one of three words.
            statements += [
                f"DELETE FROM {_quote(target)}",  # noqa: S608
                f"INSERT INTO {_quote(target)} ({columns}) "  # noqa: S608
                f"SELECT date_trunc('{g}', bucket, 'UTC'), {', '.join([*dims, *aggregates])} "
                f"FROM {_quote(source)} GROUP BY {group}",
            ]
        source = target
    return statements


async def fill_coarse_tables(
    conn: AsyncConnection, spec: RollupSpec, granularities: Sequence[str] | None = None
) -> None:
    """Rebuild `spec`'s coarse tables (default: all) from its base table, in `conn`'s open transaction.

    The lock is held until that transaction ends: commit soon after.
    """
    for statement in fill_statements(spec, granularities):
        await conn.execute(text(statement))
    if spec.sketch_columns:
        wanted = spec.coarse_granularities if granularities is None else tuple(granularities)
        source = spec.table
        for g in spec.coarse_granularities:  # ascending, as the statements: each source is already whole
            if g in wanted:
                await _unite_sketches(conn, spec, source, g)
            source = spec.table_for(g)


async def _unite_sketches(conn: AsyncConnection, spec: RollupSpec, source: str, granularity: str) -> None:
    """Set the sketch columns of `spec`'s `granularity` table to the unions of `source`'s rows."""
    target = _quote(spec.table_for(granularity))
    dims = [_quote(c) for c in spec.dimension_columns]
    columns = [_quote(c) for c in spec.sketch_columns]
    gathered = [f"array_agg({c}) FILTER (WHERE {c} IS NOT NULL)" for c in columns]
    group = ", ".join(str(i + 1) for i in range(1 + len(dims)))
    rows = (
        await conn.execute(
            text(
                f"SELECT date_trunc('{granularity}', bucket, 'UTC'), {', '.join([*dims, *gathered])} "  # noqa: S608
                f"FROM {_quote(source)} GROUP BY {group}"
            )
        )
    ).all()
    ops = [spec.measure(c).op for c in spec.sketch_columns]
    width = 1 + len(dims)

    def unite() -> list[dict[str, Any]]:
        out = []
        for row in rows:
            params: dict[str, Any] = {f"k{i}": v for i, v in enumerate(row[:width])}
            for i, (stored, op) in enumerate(zip(row[width:], ops, strict=True)):
                params[f"s{i}"] = sketches.encoded_union(op, stored) if stored else None
            out.append(params)
        return out

    updates = await asyncio.to_thread(unite)
    if not updates:
        return
    keys = ["bucket", *dims]
    await conn.execute(
        text(
            f"UPDATE {target} SET {', '.join(f'{c} = :s{i}' for i, c in enumerate(columns))} "  # noqa: S608
            f"WHERE {' AND '.join(f'{k} = :k{i}' for i, k in enumerate(keys))}"
        ),
        updates,
    )


async def fill_coarse_tables_at(url: str, specs: Sequence[RollupSpec]) -> None:
    """For tests and benchmarks that seed base tables directly: rebuild every coarse table, one transaction each."""
    engine = create_async_engine(asyncpg_url(url), poolclass=NullPool)
    try:
        for spec in specs:
            async with engine.begin() as conn:
                await conn.execute(text("SET LOCAL statement_timeout = 0"))
                await fill_coarse_tables(conn, spec)
    finally:
        await engine.dispose()
