"""SQL text for the flush, built once per rollup spec. Pure.

One `INSERT ... SELECT FROM unnest(arrays) ON CONFLICT DO UPDATE` per rollup and
batch: one round trip whatever the number of rows. Identifiers come only from
validated spec names (the spec parser restricts them) and are quoted anyway.
Rows are sent sorted by key so that concurrent consumers lock rows in the same
order and do not deadlock each other.
"""

from __future__ import annotations

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


@dataclass(frozen=True, slots=True)
class Upsert:
    """The statement adding one batch's cells into one rollup table."""

    plan: RollupPlan
    statement: TextClause

    def params(self, cells: Cells) -> dict[str, list[Any]]:
        """Column arrays for `unnest`, rows in key order (transposed in C, not cell by cell)."""
        keys, values = zip(*sorted(cells.items()), strict=True) if cells else ((), ())
        width = len(self.plan.dimensions) + 1 + len(self.plan.ops)
        columns = [*zip(*keys, strict=True), *zip(*values, strict=True)] if cells else [()] * width
        return {f"c{i}": list(column) for i, column in enumerate(columns)}


def upsert(plan: RollupPlan) -> Upsert:
    spec = plan.spec
    table = quote(spec.table)
    keys = [quote(c) for c in spec.key_columns]
    measures = [(quote(m.column), m.op) for m in spec.measures]
    types = ["timestamptz", *["text"] * len(spec.dimensions), *[_PG_TYPE[op] for _, op in measures]]
    arrays = ", ".join(f"CAST(:c{i} AS {t}[])" for i, t in enumerate(types))
    updates = ", ".join(f"{col} = {_merge_expression(table, col, op)}" for col, op in measures)
    # Identifiers come from validated specs and are quoted; every value is a bound array.
    sql = (
        f"INSERT INTO {table} ({', '.join([*keys, *(c for c, _ in measures)])}) "  # noqa: S608
        f"SELECT * FROM unnest({arrays}) "
        f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
    )
    return Upsert(plan, text(sql))
