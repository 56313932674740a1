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
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from core.db import asyncpg_url
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
    measures = [(_quote(m.column), m.op) for m in spec.measures]
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
