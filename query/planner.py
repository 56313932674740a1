"""Turn a validated `RollupQuery` into one SQLAlchemy Core SELECT. Pure.

Shape: `SELECT <fields>, "stored rows" FROM (<grouped>) AS sub [WHERE <measure ranges>
AND <after cursor>] ORDER BY <total order> LIMIT n+1 [OFFSET k]`, where `<grouped>`
reads the coarsest stored table that serves the query (`stored_granularity`: a 90-day
hourly dashboard reads 2,160 hour buckets per group, not 129,600 minute ones),
re-buckets with `date_trunc(<granularity>, bucket, <tz>)` and merges measures
exactly (count and sum by sum, min by min, max by max). Measure ranges and the
keyset predicate apply to the grouped subquery because they compare merged
measures, not stored rows. `stored rows` counts the stored rows merged into each row.

NULLs (nullable sum/min/max) sort last in both directions, and the predicate
says so explicitly, so a cursor walk visits every row exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    Numeric,
    Select,
    Table,
    and_,
    false,
    func,
    literal_column,
    or_,
    select,
)
from sqlalchemy.sql.expression import FromClause

from query.cursor import Kind, Value
from query.derived import ROWS, fetched_columns, measure_columns
from query.params import Bound, OrderItem, RollupQuery
from query.timerange import LOCAL_GRANULARITIES, nests, on_boundaries, parse_zone
from schemas.rollups import GRANULARITIES, Granularity, RollupSpec

__all__ = ["ROWS", "count_plan", "grouped", "order_kinds", "plan", "stored_granularity"]

_MERGE: dict[str, Callable[..., ColumnElement[object]]] = {
    "count": func.sum,
    "sum": func.sum,
    "min": func.min,
    "max": func.max,
}


def order_kinds(spec: RollupSpec, order: Sequence[OrderItem]) -> tuple[Kind, ...]:
    """How each order column's cursor value is typed."""

    def kind(column: str) -> Kind:
        if column == "bucket":
            return "time"
        return "text" if column in spec.dimension_columns else "number"

    return tuple(kind(o.column) for o in order)


def nullable(spec: RollupSpec, column: str) -> bool:
    """Only merged sum/min/max, averages and percentiles can be NULL (every contributing value missing)."""
    field = spec.field(column)
    return field is not None and column != "count" and field.kind != "uniq"


def stored_granularity(spec: RollupSpec, q: RollupQuery) -> Granularity:
    """The coarsest stored granularity whose table answers `q` exactly (the base one at worst).

    A table serves when both ends of the range are on its bucket boundaries and, if the
    rows are grouped by bucket, each asked bucket is a whole number of its buckets in the
    query's zone (`nests`: a +05:30 zone's days need minutes, Paris's days hours, only UTC
    days the day table). Without a bucket in the group, the granularity only aligns the
    range, so a table coarser than it serves any range its buckets tile.
    """
    best = spec.granularity
    for stored in spec.granularities:  # ascending: the last that serves is the coarsest
        if not on_boundaries(q.range, stored):
            continue
        if "bucket" in q.group and not nests(stored, q.granularity, q.tzinfo, q.range):
            continue
        best = stored
    return best


def bucket_expr(stored: str, table: Table, granularity: str, zone: str = "UTC") -> ColumnElement[object]:
    """The asked bucket of each row of `table` (buckets of `stored`): the column itself when
    they are the same size, else `date_trunc` in the query's zone."""
    if granularity == stored:
        return table.c.bucket
    if granularity not in GRANULARITIES:  # validated upstream; a literal must never be client text
        raise ValueError(f"unknown granularity {granularity!r}")
    zone = parse_zone(zone).key if granularity in LOCAL_GRANULARITIES else "UTC"  # an IANA name, re-checked
    # Literals, not bind parameters: SELECT and GROUP BY must be the same expression to Postgres.
    return func.date_trunc(
        literal_column(f"'{granularity}'"),
        table.c.bucket,
        literal_column(f"'{zone}'"),
        type_=DateTime(timezone=True),
    )


def grouped(
    spec: RollupSpec, table: Table, q: RollupQuery, stored: str | None = None, measures: Sequence[str] | None = None
) -> Select[*tuple[Any, ...]]:
    """The rows of `q` grouped and merged: its group key and `measures` (default: every measure it
    computes), then `stored rows`."""
    stored = stored or spec.granularity
    columns: list[ColumnElement[Any]] = []
    keys: list[ColumnElement[object]] = []
    for name in q.group:
        expr = bucket_expr(stored, table, q.granularity, q.zone) if name == "bucket" else table.c[name]
        keys.append(expr)
        columns.append(expr.label(name))
    for name in measure_columns(spec, q.computed_measures if measures is None else measures):
        columns.append(_merged(spec, table, name).label(name))
    columns.append(func.count(type_=BigInteger()).label(ROWS))
    conditions = [table.c.bucket >= q.range.start, table.c.bucket < q.range.end]
    conditions += [table.c[dim].in_(values) for dim, values in q.filters]
    stmt = select(*columns).where(*conditions)
    if keys:
        return stmt.group_by(*keys)
    # Totals without a group key: an empty range is no row, not one row of NULLs.
    return stmt.having(func.count() > 0)


def _merged(spec: RollupSpec, table: Table, name: str) -> ColumnElement[Any]:
    """A measure field over the group's stored rows: count and sum by sum, min by min, max by max;
    `avg_<col>` as sum/count; a sketch column's stored sketches gathered for query.derived to unite."""
    if name in spec.sketch_columns:
        column = table.c[name]
        return func.array_agg(column).filter(column.isnot(None))
    field = spec.field(name)
    if field is not None and field.kind == "avg":
        total, count = (func.sum(table.c[c], type_=Numeric()) for c in field.source)
        return total / func.nullif(count, 0)
    return _MERGE[spec.measure(name).op](table.c[name], type_=Numeric())


def _same(column: ColumnElement[object], value: Value) -> ColumnElement[bool]:
    return column.is_(None) if value is None else column == value


def _beyond(
    column: ColumnElement[object], item: OrderItem, value: Value, can_be_null: bool
) -> ColumnElement[bool] | None:
    if value is None:
        return None  # NULLs sort last: nothing in this column comes after a NULL
    strictly = column < value if item.descending else column > value
    return or_(strictly, column.is_(None)) if can_be_null else strictly


def after(
    spec: RollupSpec, sub: FromClause, order: Sequence[OrderItem], values: Sequence[Value]
) -> ColumnElement[bool]:
    """Rows strictly after `values` in `order`: OR over i of (equal on 0..i-1 AND beyond on i)."""
    disjuncts: list[ColumnElement[bool]] = []
    for i, item in enumerate(order):
        beyond = _beyond(sub.c[item.column], item, values[i], nullable(spec, item.column))
        if beyond is None:
            continue
        prefix = [_same(sub.c[o.column], v) for o, v in zip(order[:i], values[:i], strict=True)]
        disjuncts.append(and_(*prefix, beyond))
    return or_(*disjuncts) if disjuncts else false()


_COMPARE: dict[str, Callable[[ColumnElement[Any], Any], ColumnElement[bool]]] = {
    "gt": lambda c, v: c > v,
    "gte": lambda c, v: c >= v,
    "lt": lambda c, v: c < v,
    "lte": lambda c, v: c <= v,
    "eq": lambda c, v: c == v,
}


def _in_bounds(sub: FromClause, bounds: Sequence[tuple[str, Sequence[Bound]]]) -> list[ColumnElement[bool]]:
    """Range filters on merged measures; a NULL measure satisfies no bound."""
    return [_COMPARE[b.op](sub.c[measure], b.value) for measure, items in bounds for b in items]


def plan(
    spec: RollupSpec,
    table: Table,
    q: RollupQuery,
    cursor: Sequence[Value] | None = None,
    *,
    stored: str | None = None,
) -> Select[*tuple[Any, ...]]:
    """The page query over `table`, whose buckets are `stored` (default: the base table's): the
    fields, then `stored rows`; it fetches `limit + 1` rows so the caller knows whether a next
    page exists (an export fetches exactly `limit`)."""
    sub = grouped(spec, table, q, stored).subquery("sub")
    fetched = select(*(sub.c[c] for c in fetched_columns(spec, q)), sub.c[ROWS])
    if q.in_python:  # ordered or filtered by a sketch field: every group, paged by query.derived.finish
        return fetched
    stmt = fetched.where(*_in_bounds(sub, q.bounds))
    if cursor is not None:
        stmt = stmt.where(after(spec, sub, q.order, cursor))
    ordering = [(sub.c[o.column].desc() if o.descending else sub.c[o.column].asc()).nulls_last() for o in q.order]
    stmt = stmt.order_by(*ordering).limit(q.limit if q.export else q.limit + 1)
    return stmt.offset(q.offset) if q.offset else stmt


def count_plan(
    spec: RollupSpec, table: Table, q: RollupQuery, *, stored: str | None = None
) -> Select[*tuple[Any, ...]]:
    """`total=true`: how many rows the whole query matches, and how many stored rows they merge."""
    sub = grouped(spec, table, q, stored, [m for m, _ in q.bounds]).subquery("sub")  # no sketch is gathered to count
    return select(func.count(type_=BigInteger()), func.coalesce(func.sum(sub.c[ROWS]), 0, type_=BigInteger())).where(
        *_in_bounds(sub, q.bounds)
    )
