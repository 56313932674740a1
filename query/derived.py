"""Fields computed after SQL, and the paging SQL cannot do for them. Pure.

Postgres cannot read DataSketches bytes (no extension is assumed), so a query's grouped
SQL gathers each group's stored sketches (`array_agg`, query.planner) and this module
turns them into values: `uniq_<col>` is the estimate of the union of the group's HLL
sketches, `p<NN>_<col>` the quantile of the union of its KLL sketches (each source
united once, however many percentiles read it). Never an average of estimates.

When a query orders or filters by such a field (`RollupQuery.in_python`), SQL returns
every group and `finish` applies the bounds, the total order, the cursor, the offset
and the limit here, with SQL's semantics: NULLs last in both directions, a bound never
satisfied by NULL, keyset "strictly after" the cursor's values. tests/unit/test_query_derived.py
holds this to the SQL path on orders both can run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cmp_to_key
from typing import Any

from query.cursor import Value
from query.params import Bound, OrderItem, RollupQuery
from schemas import sketches
from schemas.rollups import Field, RollupSpec

ROWS = "stored rows"  # a space: no rollup column can be named so, so it never collides


def measure_columns(spec: RollupSpec, measures: Sequence[str]) -> tuple[str, ...]:
    """What grouped SQL computes for these fields: each by its own name, except a percentile,
    which reads its `quantiles_<col>` sketches once, under that name."""
    out: dict[str, None] = {}
    for name in measures:
        field = spec.field(name)
        out[field.source[0] if field is not None and field.kind == "percentile" else name] = None
    return tuple(out)


def fetched_columns(spec: RollupSpec, q: RollupQuery) -> tuple[str, ...]:
    """The columns the page query returns, before `stored rows`: the fields (a percentile as its
    sketch source) or, paging in Python, the group key and every measure the query computes."""
    if q.in_python:
        return (*q.group, *measure_columns(spec, q.computed_measures))
    return measure_columns(spec, q.fields)


@dataclass(frozen=True, slots=True)
class _Reading:
    """How to read a query's fetched rows, resolved once per query: which fields are taken as SQL
    gave them, which are distinct counts, and which percentiles each quantiles sketch answers."""

    names: tuple[str, ...]  # the fetched columns, then `stored rows`
    plain: tuple[str, ...]
    uniq: tuple[str, ...]
    quantiles: tuple[tuple[str, tuple[str, ...], tuple[float, ...]], ...]  # (source, fields, ranks)

    @classmethod
    def of(cls, spec: RollupSpec, names: Sequence[str], wanted: Sequence[str]) -> _Reading:
        plain: list[str] = []
        uniq: list[str] = []
        by_source: dict[str, list[Field]] = {}
        for name in wanted:
            field = spec.field(name)
            if field is None or field.kind in ("column", "avg"):
                plain.append(name)
            elif field.kind == "uniq":
                uniq.append(name)
            else:
                by_source.setdefault(field.source[0], []).append(field)
        quantiles = tuple(
            (source, tuple(f.name for f in fields), tuple(f.rank for f in fields))
            for source, fields in by_source.items()
        )
        return cls((*names, ROWS), tuple(plain), tuple(uniq), quantiles)

    def values(self, row: Sequence[Any]) -> dict[str, Any]:
        """One fetched row as field values: sketches turned into estimates, the rest as SQL gave them."""
        got = dict(zip(self.names, row, strict=True))
        out = {name: got[name] for name in self.plain}
        for name in self.uniq:
            out[name] = sketches.distinct_count(got[name])
        for source, fields, ranks in self.quantiles:
            out.update(zip(fields, sketches.quantile_values(got[source], ranks), strict=True))
        out[ROWS] = got[ROWS]
        return out


@dataclass(frozen=True, slots=True)
class Page:
    """Rows as the fields in `q.fields` order, then `stored rows` (at most limit + 1; an export, limit);
    `matched`: paging in Python, how many groups satisfied the bounds (the total), else None."""

    rows: list[tuple[Any, ...]]
    matched: int | None = None


def plain(spec: RollupSpec, q: RollupQuery) -> bool:
    """True when SQL's rows are the page as they are: nothing to unite, nothing to rank here."""
    return not q.in_python and not any(_derived(spec, f) for f in q.fields)


def finish(
    spec: RollupSpec, q: RollupQuery, fetched: Sequence[Sequence[Any]], after: Sequence[Value] | None = None
) -> Page:
    """The page from the page query's rows (query.planner.plan). Unless `plain`, CPU work (about 150 µs
    per group of full HLLs): callers run it off the event loop."""
    if plain(spec, q):
        return Page([tuple(r) for r in fetched])
    wanted = (*q.fields, *(m for m in q.computed_measures if m not in q.fields)) if q.in_python else q.fields
    reading = _Reading.of(spec, fetched_columns(spec, q), wanted)
    rows = [reading.values(r) for r in fetched]
    if not q.in_python:
        return Page([tuple(r[f] for f in (*q.fields, ROWS)) for r in rows])
    kept = [r for r in rows if all(_within(r[m], bounds) for m, bounds in q.bounds)]
    kept.sort(key=cmp_to_key(lambda a, b: compare(q.order, a, b)))
    walk = kept
    if after is not None:
        cursor = {o.column: v for o, v in zip(q.order, after, strict=True)}
        walk = [r for r in kept if compare(q.order, r, cursor) > 0]
    page = walk[q.offset : q.offset + (q.limit if q.export else q.limit + 1)]
    return Page([tuple(r[f] for f in (*q.fields, ROWS)) for r in page], len(kept))


def _derived(spec: RollupSpec, name: str) -> bool:
    field = spec.field(name)
    return field is not None and field.sketch


_TESTS = {
    "gt": lambda v, b: v > b,
    "gte": lambda v, b: v >= b,
    "lt": lambda v, b: v < b,
    "lte": lambda v, b: v <= b,
    "eq": lambda v, b: v == b,
}


def _within(value: Any, bounds: Sequence[Bound]) -> bool:
    """SQL's `value <op> bound AND ...`: a NULL satisfies no bound."""
    return value is not None and all(_TESTS[b.op](value, b.value) for b in bounds)


def compare(order: Sequence[OrderItem], a: dict[str, Any], b: dict[str, Any]) -> int:
    """-1, 0 or 1 as `a` sorts before, with, or after `b`: column by column, NULLs last either way."""
    for item in order:
        x, y = a[item.column], b[item.column]
        if x == y:
            continue
        if x is None:
            return 1
        if y is None:
            return -1
        before = x < y
        return (1 if before else -1) if item.descending else (-1 if before else 1)
    return 0
