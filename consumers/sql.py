"""SQL text for the flush, built once per rollup table. Pure.

One `INSERT ... SELECT FROM unnest(arrays) ON CONFLICT DO UPDATE` per rollup table
(its base table and each coarse one) and batch: one round trip whatever the number
of rows; from COPY_MIN_ROWS rows, COPY into a temporary staging table (one per table)
and one `INSERT ... SELECT` from it, which is faster for many rows. Identifiers come
only from validated spec names (the spec parser restricts them) and are quoted
anyway. Rows are merged in key order, and tables written in one order (`upserts`),
so that concurrent consumers lock rows in the same order and do not deadlock each other.

Sketch measures (uniq, quantiles) cannot be merged in SQL without an extension, so a
table holding them is read, merged and written under the row locks of the same
transaction. The upsert inserts a new row with the batch's sketches and, on conflict,
leaves an existing row's sketches as they are; it RETURNs, per row, whether it inserted
it (`xmax = 0`: an inserted tuple has no locker; the version a DO UPDATE writes carries
the updating transaction's lock) and the stored sketches, already locked by it. The flush
unites the batch's sketches into the existing rows' (`merged_sketches`) and `set_sketches`
writes those unions: a row new in this batch costs no second write (a backfill's rows
mostly are). Locking is the upsert's, in key order, so the deadlock argument above holds
unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import TextClause, text

from consumers.aggregate import Cells, RollupPlan
from schemas import sketches
from schemas.rollups import SKETCH_OPS

_PG_TYPE = {
    "count": "bigint",
    "sum": "numeric",
    "min": "numeric",
    "max": "numeric",
    "uniq": "bytea",
    "quantiles": "bytea",
}

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
    statement: TextClause  # INSERT ... SELECT FROM unnest(arrays) ... ON CONFLICT [RETURNING sketches]
    columns: tuple[str, ...]  # the table's columns, in the cells' order (key, then measures)
    stage: str  # a temporary table of the same columns, emptied at every commit
    create_stage: TextClause
    from_stage: TextClause  # INSERT ... SELECT FROM stage ... ON CONFLICT [RETURNING sketches]
    sketch_at: tuple[int, ...] = ()  # positions of the sketch measures in a cell's values
    set_sketches: TextClause | None = None  # UPDATE ... FROM unnest(keys, unions)

    def _values(self, cells: Cells) -> list[tuple[Any, ...]]:
        """The cells' measures as stored: sketches as their bytes (CPU: callers run it off the loop)."""
        if not self.sketch_at:
            return list(map(tuple, cells.values()))
        at = frozenset(self.sketch_at)
        return [
            tuple(sketches.encode(v) if i in at and v is not None else v for i, v in enumerate(values))
            for values in cells.values()
        ]

    def params(self, cells: Cells) -> dict[str, list[Any]]:
        """Column arrays for `unnest` (transposed in C, not cell by cell; Postgres sorts them)."""
        width = len(self.columns)
        if not cells:
            return {f"c{i}": [] for i in range(width)}
        values = cells.values() if not self.sketch_at else self._values(cells)
        columns = [*zip(*cells.keys(), strict=True), *zip(*values, strict=True)]
        return {f"c{i}": list(column) for i, column in enumerate(columns)}

    def records(self, cells: Cells) -> list[tuple[Any, ...]]:
        """The cells as rows for COPY into the stage."""
        return list(map(tuple.__add__, cells.keys(), self._values(cells)))

    def merged_sketches(self, cells: Cells, stored: Sequence[Sequence[Any]]) -> dict[str, list[Any]]:
        """`set_sketches`' arrays: for each row the upsert found existing (`stored`: its RETURNING
        rows, key, then whether it inserted the row, then the stored sketch bytes or NULL) and the
        batch has a sketch for, the stored sketches united with the batch's, encoded. A column the
        batch has no value for keeps its stored bytes; a row the upsert inserted holds the batch's."""
        width = len(self.plan.spec.key_columns)
        ops = [self.plan.spec.measures[i].op for i in self.sketch_at]
        keys: list[tuple[Any, ...]] = []
        unions: list[list[bytes | None]] = [[] for _ in self.sketch_at]
        for row in stored:
            if row[width]:  # inserted: it holds the batch's sketches already
                continue
            key = tuple(row[:width])
            values = cells[key]
            new = [values[i] for i in self.sketch_at]
            if all(v is None for v in new):
                continue
            keys.append(key)
            for column, op, mine, theirs in zip(unions, ops, new, row[width + 1 :], strict=True):
                if mine is None:
                    column.append(None if theirs is None else bytes(theirs))
                elif theirs is None:
                    column.append(sketches.encode(mine))
                else:
                    column.append(sketches.encode(sketches.union(sketches.decode(op, bytes(theirs)), mine)))
        params: dict[str, list[Any]] = {f"k{i}": list(c) for i, c in enumerate(zip(*keys, strict=True))}
        if not keys:
            params = {f"k{i}": [] for i in range(width)}
        params.update({f"s{i}": column for i, column in enumerate(unions)})
        return params


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
    sketch_columns = [quote(m.column) for m in spec.measures if m.is_sketch]
    columns = [*keys, *(c for c, _ in measures)]
    types = ["timestamptz", *["text"] * len(spec.dimensions), *[_PG_TYPE[op] for _, op in measures]]
    arrays = ", ".join(f"CAST(:c{i} AS {t}[])" for i, t in enumerate(types))
    # On conflict a sketch column keeps its stored bytes: the flush unites the batch's into them.
    updates = ", ".join(f"{col} = {_merge_expression(table, col, op)}" for col, op in measures if op not in SKETCH_OPS)
    if not updates:  # sketches only: the upsert still locks and returns the row, changing nothing
        updates = f"{sketch_columns[0]} = {table}.{sketch_columns[0]}"
    # Rows go in key order, so that concurrent consumers lock rows in the same order and do not
    # deadlock each other; Postgres sorts them, cheaper than Python would.
    order = ", ".join(str(i + 1) for i in range(len(keys)))
    merge = f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}"
    stage = f"tally_stage_{name.removeprefix('agg_')}"  # one per table: `tally_stage_<name>[__<granularity>]`
    returning = f" RETURNING {', '.join([*keys, '(xmax = 0)', *sketch_columns])}" if sketch_columns else ""
    set_sketches = None
    if sketch_columns:
        key_types = ["timestamptz", *["text"] * len(spec.dimensions)]
        sources = [f"CAST(:k{i} AS {t}[])" for i, t in enumerate(key_types)]
        sources += [f"CAST(:s{i} AS bytea[])" for i in range(len(sketch_columns))]
        names = [f"k{i}" for i in range(len(keys))] + [f"s{i}" for i in range(len(sketch_columns))]
        set_sketches = text(
            f"UPDATE {table} SET {', '.join(f'{c} = v.s{i}' for i, c in enumerate(sketch_columns))} "  # noqa: S608
            f"FROM unnest({', '.join(sources)}) AS v({', '.join(names)}) "
            f"WHERE {' AND '.join(f'{table}.{k} = v.k{i}' for i, k in enumerate(keys))}"
        )
    # Identifiers come from validated specs and are quoted; every value is a bound array or COPY row.
    return Upsert(
        plan,
        name,
        text(
            f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) "  # noqa: S608
            f"ORDER BY {order} {merge}{returning}"
        ),
        tuple(c.strip('"') for c in columns),
        stage,
        text(f"CREATE TEMPORARY TABLE IF NOT EXISTS {quote(stage)} (LIKE {table}) ON COMMIT DELETE ROWS"),
        text(
            f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608
            f"SELECT {', '.join(columns)} FROM {quote(stage)} ORDER BY {order} {merge}{returning}"
        ),
        tuple(i for i, m in enumerate(spec.measures) if m.is_sketch),
        set_sketches,
    )
