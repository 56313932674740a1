"""SQL text for the flush, built once per rollup table. Pure.

One `INSERT ... SELECT FROM unnest(arrays) ON CONFLICT DO UPDATE` per rollup table
(its base table and each coarse one) and batch: one round trip whatever the number
of rows; from COPY_MIN_ROWS rows, COPY into a temporary staging table (one per table)
and one `INSERT ... SELECT` from it, which is faster for many rows. Identifiers come
only from validated spec names (the spec parser restricts them) and are quoted
anyway. Rows are merged in key order, and tables written in one order (`upserts`),
so that concurrent consumers lock rows in the same order and do not deadlock each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import TextClause, text

from consumers.aggregate import Cells, RollupPlan

_PG_TYPE = {"count": "bigint", "sum": "numeric", "min": "numeric", "max": "numeric"}

# Fenced twice: by the stored offset (a zombie after a rebalance) and by the rollup
# registry's version (a consumer started with another rollups file).
ADVANCE_OFFSET = text(
    "UPDATE tally_offsets SET next_offset = :new, updated_at = now() "
    "WHERE group_id = :group_id AND topic = :topic AND partition = :partition AND next_offset = :expected "
    "AND (SELECT value FROM tally_meta WHERE key = 'rollups_version') = :version"
)
# The first offset of a partition a group applied each rollup from: what a backfill must stop at.
RECORD_STARTS = text(
    "INSERT INTO tally_rollup_starts (group_id, rollup, topic, partition, start_offset) "
    "SELECT :group_id, r, :topic, :partition, :start FROM unnest(CAST(:rollups AS text[])) AS r "
    "ON CONFLICT DO NOTHING"
)
ENSURE_OFFSETS = text(
    "INSERT INTO tally_offsets (group_id, topic, partition, next_offset) "
    "SELECT :group_id, :topic, p, 0 FROM unnest(CAST(:partitions AS integer[])) AS p "
    "ON CONFLICT (group_id, topic, partition) DO NOTHING"
)
READ_OFFSETS = text(
    "SELECT partition, next_offset FROM tally_offsets "
    "WHERE group_id = :group_id AND topic = :topic AND partition = ANY(CAST(:partitions AS integer[]))"
)


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _merge_expression(table: str, column: str, op: str) -> str:
    mine, theirs = f"{table}.{column}", f"EXCLUDED.{column}"
    if op == "count":
        return f"{mine} + {theirs}"
    if op == "sum":  # NULL + x must be x; NULL + NULL stays NULL
        return f"COALESCE({mine} + {theirs}, {mine}, {theirs})"
    return f"{'LEAST' if op == 'min' else 'GREATEST'}({mine}, {theirs})"  # both ignore NULLs


# From this many rows up, a rollup's cells are COPied into a staging table and merged with one
# INSERT ... SELECT: 1.3-1.6x the rows/s of the unnest statement at 10k-50k rows, no gain at 1k
# (bench/upsert_paths.py, docs/performance.md).
COPY_MIN_ROWS = 5_000


@dataclass(frozen=True, slots=True)
class Upsert:
    """The statements adding one batch's cells into one rollup table: unnest for a few rows, COPY for many."""

    plan: RollupPlan
    table: str  # the table written: the rollup's base table or one of its coarser ones
    statement: TextClause  # INSERT ... SELECT FROM unnest(arrays) ... ON CONFLICT
    columns: tuple[str, ...]  # the table's columns, in the cells' order (key, then measures)
    stage: str  # a temporary table of the same columns, emptied at every commit
    create_stage: TextClause
    from_stage: TextClause  # INSERT ... SELECT FROM stage ... ON CONFLICT

    def params(self, cells: Cells) -> dict[str, list[Any]]:
        """Column arrays for `unnest` (transposed in C, not cell by cell; Postgres sorts them)."""
        width = len(self.columns)
        if not cells:
            return {f"c{i}": [] for i in range(width)}
        columns = [*zip(*cells.keys(), strict=True), *zip(*cells.values(), strict=True)]
        return {f"c{i}": list(column) for i, column in enumerate(columns)}

    def records(self, cells: Cells) -> list[tuple[Any, ...]]:
        """The cells as rows for COPY into the stage."""
        return list(map(tuple.__add__, cells.keys(), map(tuple, cells.values())))


def upserts(plans: Sequence[RollupPlan]) -> tuple[Upsert, ...]:
    """Every table's statements, in the order every consumer writes them (so they never deadlock each
    other): rollup by rollup, each base table first, then its coarser ones, ascending."""
    return tuple(upsert(p, g) for p in plans for g in p.spec.granularities)


def upsert(plan: RollupPlan, granularity: str | None = None) -> Upsert:
    """The statements for the rollup's table at `granularity` (default: its base table)."""
    spec = plan.spec
    name = spec.table_for(granularity or spec.granularity)
    table = quote(name)
    keys = [quote(c) for c in spec.key_columns]
    measures = [(quote(m.column), m.op) for m in spec.measures]
    columns = [*keys, *(c for c, _ in measures)]
    types = ["timestamptz", *["text"] * len(spec.dimensions), *[_PG_TYPE[op] for _, op in measures]]
    arrays = ", ".join(f"CAST(:c{i} AS {t}[])" for i, t in enumerate(types))
    updates = ", ".join(f"{col} = {_merge_expression(table, col, op)}" for col, op in measures)
    # Rows go in key order, so that concurrent consumers lock rows in the same order and do not
    # deadlock each other; Postgres sorts them, cheaper than Python would.
    order = ", ".join(str(i + 1) for i in range(len(keys)))
    merge = f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
    stage = f"tally_stage_{name.removeprefix('agg_')}"  # one per table: `tally_stage_<name>[__<granularity>]`
    # Identifiers come from validated specs and are quoted; every value is a bound array or COPY row.
    return Upsert(
        plan,
        name,
        text(f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) ORDER BY {order} {merge}"),  # noqa: S608
        tuple(c.strip('"') for c in columns),
        stage,
        text(f"CREATE TEMPORARY TABLE IF NOT EXISTS {quote(stage)} (LIKE {table}) ON COMMIT DELETE ROWS"),
        text(
            f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608
            f"SELECT {', '.join(columns)} FROM {quote(stage)} ORDER BY {order} {merge}"
        ),
    )
