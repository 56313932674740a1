"""Pre-aggregation of normalized events into rollup rows. Pure: no I/O, and no clock but one.

The one: a rollup with a retention skips events in buckets already past it
(`aggregate_retained`), judged at a time the caller gives, or the wall clock.

Every measure merges by addition or min/max, so aggregating a batch in memory and
adding it to the stored row gives the same numbers as counting event by event;
`merge` is exact for any split of the events into batches. Numbers become
`Decimal` (ints as is, floats through `repr`, the shortest exact spelling of the
JSON number) and are added in a context wide enough that nothing is rounded.

Rules, shared with the query API through the stored values:
- bucket: `ts` (epoch ms) floored to the rollup granularity, a UTC-aware datetime;
- dimension and `where` values: str as is, missing/None -> "", bool -> "true" /
  "false", any other JSON value -> its orjson text;
- count: events in the row; sum/min/max: over int or float values (never bool) at
  the path; other values are ignored and leave the measure None if none is numeric;
- uniq: an HLL sketch of the row's distinct values at the path, each as its dimension
  text (missing/None is no value); quantiles: a KLL sketch of the numeric values as
  doubles (schemas.sketches). Sketches merge by union; None is the empty sketch.
Two guards keep one odd event from wedging a partition (Postgres would refuse the
row forever): NUL characters, which `text` cannot hold, become U+FFFD, and a
dimension value is cut (at a character boundary) to its share of
`MAX_KEY_BYTES`, so a row key always fits in a btree index entry.

Events are views (consumers.view), read a column at a time (`Columns`): the per-event
work is C loops, the Python work is per row. tests/consumer_oracle.py keeps the
event-by-event original that tests/unit/test_consumer_columns.py holds this to.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from functools import reduce
from itertools import compress, repeat
from operator import attrgetter, call, floordiv
from typing import Any, Final

from consumers.view import View, attribute, keys_of, no_properties
from schemas import sketches
from schemas.events import lookup
from schemas.rollups import GRANULARITY_MS, RollupSpec, dimension_text, expiry_cutoff_ms

# Wide enough that adding any two JSON numbers is exact.
EXACT: Final = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Postgres btree entries hold at most ~2700 bytes; the dimension values of one key stay below this.
MAX_KEY_BYTES: Final = 2000
MIN_DIMENSION_BYTES: Final = 64

Key = tuple[Any, ...]  # (bucket datetime, *dimension strings)
Value = Any  # count -> int; sum/min/max -> Decimal or None; uniq/quantiles -> a sketch or None
Cells = dict[Key, list[Value]]  # measure values in the spec's measure order
Aggregates = dict[str, Cells]  # rollup name -> cells

_COUNT, _SUM, _MIN, _MAX, _UNIQ, _QUANTILES = 0, 1, 2, 3, 4, 5
_OPS: Final = {"count": _COUNT, "sum": _SUM, "min": _MIN, "max": _MAX, "uniq": _UNIQ, "quantiles": _QUANTILES}
_SKETCHES: Final = frozenset({_UNIQ, _QUANTILES})


stringify = dimension_text  # the contract's rule, shared with the rollup spec parser


def fit(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8, never inside a character."""
    if len(text) * 4 <= max_bytes:  # fast path: cannot be too long
        return text
    encoded = text.encode()
    if len(encoded) <= max_bytes:
        return text
    return encoded[:max_bytes].decode(errors="ignore")


def to_decimal(value: Any) -> Decimal | None:
    """The exact Decimal of a JSON number; None for anything else (bool included)."""
    kind = type(value)
    if kind is int:
        return Decimal(value)
    if kind is float:
        return Decimal(repr(value))
    return None


def bucket_of(ts_ms: int, granularity: str) -> datetime:
    """`ts_ms` floored to the granularity, in UTC."""
    width = GRANULARITY_MS[granularity]
    return EPOCH + timedelta(milliseconds=ts_ms - ts_ms % width)


@dataclass(frozen=True, slots=True)
class RollupPlan:
    """A spec compiled once: split paths and op codes, so the per-event loop only looks up."""

    spec: RollupSpec
    width_ms: int
    where: tuple[tuple[tuple[str, ...], frozenset[str]], ...]
    dimensions: tuple[tuple[str, ...], ...]
    dimension_bytes: int
    value_paths: tuple[tuple[str, ...], ...]  # distinct measured paths, each looked up once per event
    ops: tuple[tuple[int, int], ...]  # per measure: (op code, index into value_paths or -1)
    precisions: tuple[int, ...] = ()  # per measure: a sketch's lg_k or k, else 0

    @property
    def name(self) -> str:
        return self.spec.name

    def empty(self) -> list[Value]:
        return [0 if op == _COUNT else None for op, _ in self.ops]

    def cutoff_ms(self, now_ms: int) -> int | None:
        """Events before this are in buckets past the rollup's retention (None: kept forever)."""
        spec = self.spec
        return None if spec.retention is None else expiry_cutoff_ms(now_ms, spec.retention, spec.granularity)


def compile_rollup(spec: RollupSpec) -> RollupPlan:
    value_paths: list[tuple[str, ...]] = []
    ops: list[tuple[int, int]] = []
    precisions = tuple(m.precision or 0 for m in spec.measures)
    for measure in spec.measures:
        if measure.op == "count":
            ops.append((_COUNT, -1))
            continue
        if measure.keys not in value_paths:
            value_paths.append(measure.keys)
        ops.append((_OPS[measure.op], value_paths.index(measure.keys)))
    dims = tuple(d.keys for d in spec.dimensions)
    return RollupPlan(
        spec=spec,
        width_ms=GRANULARITY_MS[spec.granularity],
        where=tuple((tuple(path.split(".")), frozenset(values)) for path, values in spec.where.items()),
        dimensions=dims,
        dimension_bytes=max(MIN_DIMENSION_BYTES, MAX_KEY_BYTES // max(1, len(dims))),
        value_paths=tuple(value_paths),
        ops=tuple(ops),
        precisions=precisions,
    )


def compile_rollups(specs: Iterable[RollupSpec]) -> tuple[RollupPlan, ...]:
    return tuple(compile_rollup(s) for s in specs)


def _combine(op: int, old: Value, new: Value) -> Value:
    """One measure merged: None is the identity; count/sum add; min/max keep the extreme; sketches unite."""
    if new is None:
        return old
    if old is None:
        return new
    if op in _SKETCHES:
        return sketches.union(old, new)
    if op == _COUNT:
        return old + new
    if op == _SUM:
        return EXACT.add(old, new)
    if op == _MIN:
        return new if new < old else old
    return new if new > old else old


class Columns:
    """One chunk of views read column by column, each column computed once for every rollup.

    The per-event work is C loops (`map`, `zip`, `compress`, `Counter`): a column is
    one `attrgetter` pass, a bucket one `mod`/`sub` pass, a row key one `zip`.
    """

    def __init__(self, events: Sequence[View]) -> None:
        self.events = events
        self._memo: dict[tuple[str, ...], list[Any]] = {}

    def raw(self, keys: tuple[str, ...]) -> list[Any]:
        """The values at a path (None where any step is missing), as `lookup` reads a dict."""
        col = self._memo.get(keys)
        if col is not None:
            return col
        if keys[0] != "properties":
            col = list(map(attrgetter(keys[0]), self.events))
        elif len(keys) == 1:
            raise ValueError("a path into properties names a key")
        else:
            props = self._memo.get(("properties",))
            if props is None:
                props = self._properties()
            col = list(map(attrgetter(attribute(keys[1])), props))
            if len(keys) > 2:
                rest = keys[2:]
                col = [None if v is None else lookup(v, rest) for v in col]
        self._memo[keys] = col
        return col

    def _properties(self) -> list[Any]:
        props = list(map(_PROPERTIES, self.events))
        if None in props:  # absent or null: read as an object with no keys
            empty = no_properties(type(self.events[0]))
            props = [empty if p is None else p for p in props]
        self._memo[("properties",)] = props
        return props

    def where_mask(self, where: Sequence[tuple[tuple[str, ...], frozenset[str]]]) -> list[bool]:
        """Per event: does every `where` path hold one of its allowed values (compared as text)?"""
        masks = [list(map(allowed.__contains__, _where_text(self.raw(keys)))) for keys, allowed in where]
        return masks[0] if len(masks) == 1 else list(map(all, zip(*masks, strict=True)))


_PROPERTIES: Final = attrgetter("properties")
_NUMERIC: Final = frozenset({int, float})  # never bool: type(True) is bool
_FLOAT: Final = {float}
_STR_OR_NONE: Final = frozenset({str, type(None)})
_NONE_IS_EMPTY: Final = {None: ""}


def _strings(col: list[Any]) -> set[Any] | None:
    """The distinct values of a column that holds only strings and None, else None.

    One pass: the set is built first and only its few members are type-checked. A column
    with any other value (numbers and booleans hash alike: 1 == 1.0 == True) is read value by value.
    """
    try:
        distinct = set(col)
    except TypeError:  # a list or an object
        return None
    return distinct if set(map(type, distinct)) <= _STR_OR_NONE else None


def _where_text(col: list[Any]) -> list[Any]:
    """`_matches`' comparison text: strings as they are, anything else `stringify`d."""
    distinct = _strings(col)
    if distinct is not None:
        return col if None not in distinct else list(map(_NONE_IS_EMPTY.get, col, col))
    return [v if type(v) is str else stringify(v) for v in col]


def _dimension_text(col: list[Any], cap: int) -> list[Any]:
    """A dimension column as stored: `fit(stringify(v), cap)`, computed once per distinct string."""
    distinct = _strings(col)
    if distinct is not None:
        short = cap // 4  # a str this short fits in `cap` bytes whatever its characters
        fix = {v: fit(stringify(v), cap) for v in distinct if v is None or len(v) > short or "\x00" in v}
        return list(map(fix.get, col, col)) if fix else col
    return [fit(stringify(v), cap) for v in col]


def _reduce(op: int, values: list[Any], precision: int = 0) -> Value:
    """One row's numeric values (ints and floats, in event order) as the measure's Decimal, or its
    quantiles sketch."""
    if op == _QUANTILES:
        return sketches.new_quantiles(precision, values)
    if op == _SUM:
        exact: Iterable[Any] = (
            map(Decimal, map(repr, values)) if set(map(type, values)) == _FLOAT else map(to_decimal, values)
        )
        return reduce(EXACT.add, exact)
    # Python compares ints and floats exactly, and min/max keep the first of equals, as `_combine` does.
    return to_decimal(min(values) if op == _MIN else max(values))


def aggregate_rollup(plan: RollupPlan, columns: Columns, mask: list[bool] | None, cells: Cells) -> Cells:
    """Add the events of `columns` selected by `mask` (all if None) into `cells` for one rollup."""

    def pick(col: list[Any]) -> list[Any]:
        return col if mask is None else list(compress(col, mask))

    ts = pick(columns.raw(("ts",)))
    if not ts:
        return cells
    width = plan.width_ms
    slots = map(floordiv, ts, repeat(width))  # the bucket's number: its start is slot * width
    dims = [_dimension_text(pick(columns.raw(keys)), plan.dimension_bytes) for keys in plan.dimensions]
    if not plan.value_paths:  # counts only: the keys need not be kept
        counts = Counter(zip(slots, *dims, strict=True))
    else:
        keys = list(zip(slots, *dims, strict=True))
        counts = Counter(keys)
    numeric_paths = {j for op, j in plan.ops if op not in (_COUNT, _UNIQ)}
    uniq_ops = [(i, j, plan.precisions[i]) for i, (op, j) in enumerate(plan.ops) if op == _UNIQ]
    numbers: list[dict[Key, list[Any]]] = []
    for j, path in enumerate(plan.value_paths):
        values = pick(columns.raw(path))
        grouped: dict[Key, list[Any]] = {}
        if j in numeric_paths:
            numeric = list(map(_NUMERIC.__contains__, map(type, values)))
            if any(numeric):
                for key, value in compress(zip(keys, values, strict=True), numeric):
                    found = grouped.get(key)
                    if found is None:
                        grouped[key] = [value]
                    else:
                        found.append(value)
        numbers.append(grouped)
    uniques = {
        (j, lg_k): _uniq_by_key(keys, pick(columns.raw(plan.value_paths[j])), lg_k, counts.keys())
        for _, j, lg_k in uniq_ops
    }
    count_at = [i for i, (op, _) in enumerate(plan.ops) if op == _COUNT]
    numeric_ops = [(i, op, j) for i, (op, j) in enumerate(plan.ops) if op not in (_COUNT, _UNIQ)]
    empty = plan.empty()
    buckets: dict[int, datetime] = {}
    for key, n in counts.items():
        slot = key[0]
        bucket = buckets.get(slot)
        if bucket is None:
            bucket = buckets[slot] = EPOCH + timedelta(milliseconds=slot * width)
        row = (bucket, *key[1:])
        cell = cells.get(row)
        if cell is None:
            cell = cells[row] = empty.copy()
        for i in count_at:
            cell[i] += n
        for i, op, j in numeric_ops:
            found = numbers[j].get(key)
            if found is not None:
                cell[i] = _combine(op, cell[i], _reduce(op, found, plan.precisions[i]))
        for i, j, lg_k in uniq_ops:
            sketch = uniques[j, lg_k].get(key)
            if sketch is not None:
                cell[i] = _combine(_UNIQ, cell[i], sketch)
    return cells


def _uniq_by_key(keys: list[Key], values: list[Any], lg_k: int, rows: Iterable[Key]) -> dict[Key, Any]:
    """Per row key, the HLL of the values at a `uniq` path as their dimension text (None: no value).

    `rows` are the batch's row keys (every key in `keys`). Each event's value is hashed into its
    row's sketch in C loops (`map`), not a Python loop: a repeated value is hashed again, which an
    HLL ignores, and costs less than finding the distinct pairs first.
    """
    distinct = _strings(values)
    if distinct is None:
        values = [v if v is None or type(v) is str else stringify(v) for v in values]
    if distinct is None or None in distinct:
        present = [v is not None for v in values]
        keys, values = list(compress(keys, present)), list(compress(values, present))
        rows = set(keys)
    out = {key: sketches.new_uniq(lg_k, ()) for key in rows}
    deque(map(call, map(_UPDATE, map(out.__getitem__, keys)), values), maxlen=0)
    return out


_UPDATE: Final = attrgetter("update")


def plan_keys(plans: Iterable[RollupPlan]) -> frozenset[str]:
    """The `properties` keys the plans read: what a Reader for them decodes."""
    return keys_of(path for p in plans for path in (*p.dimensions, *p.value_paths, *(k for k, _ in p.where)))


def aggregate(plans: Sequence[RollupPlan], events: Sequence[View], *, now_ms: int | None = None) -> Aggregates:
    """Every rollup's cells for `events` (views of validated events: consumers.view).

    A rollup with a retention skips events whose bucket is past it at `now_ms`,
    read from the wall clock if not given (the only clock this module reads).
    """
    return aggregate_retained(plans, events, time.time_ns() // 1_000_000 if now_ms is None else now_ms)[0]


def aggregate_retained(
    plans: Sequence[RollupPlan], events: Sequence[View], now_ms: int, into: Aggregates | None = None
) -> tuple[Aggregates, dict[str, int]]:
    """`aggregate`, except that a rollup with a retention skips events whose bucket is already past it.

    Such a bucket may have been deleted by the retention job (core.retention);
    counting a late event into it would bring back a row holding only that
    event. Returns the aggregates (added into `into` if given) and, per rollup,
    how many events it would have counted but skipped. The common batch has no
    event that old and pays one pass over the timestamps.
    """
    out: Aggregates = {} if into is None else into
    expired: dict[str, int] = {}
    columns = Columns(events)
    oldest = min(columns.raw(("ts",)), default=None) if events else None
    for plan in plans:
        cells = out.setdefault(plan.name, {})
        if oldest is None:
            continue
        mask = columns.where_mask(plan.where) if plan.where else None
        cutoff = plan.cutoff_ms(now_ms)
        if cutoff is not None and oldest < cutoff:
            kept = [t >= cutoff for t in columns.raw(("ts",))]
            matched = mask if mask is not None else [True] * len(kept)
            skipped = sum(1 for k, m in zip(kept, matched, strict=True) if m and not k)
            mask = [k and m for k, m in zip(kept, matched, strict=True)]
            if skipped:
                expired[plan.name] = skipped
        aggregate_rollup(plan, columns, mask, cells)
    return out, expired


def _floors(granularity: str) -> Any:
    """The function flooring a base bucket (an aware UTC datetime) to a coarser stored granularity."""
    if granularity == "hour":
        return lambda b: b.replace(minute=0, second=0, microsecond=0)
    if granularity == "day":
        return lambda b: b.replace(hour=0, minute=0, second=0, microsecond=0)
    raise ValueError(f"{granularity!r} is not a coarse stored granularity")


def _merged(op: int, column: Sequence[Value]) -> Value:
    """One measure over the rows merged into a coarse row: `_combine` folded, in C loops where it can be."""
    if op == _COUNT:
        return sum(column)
    present = [v for v in column if v is not None]
    if not present:
        return None
    if op in _SKETCHES:
        return sketches.merged(present)
    if op == _SUM:
        return reduce(EXACT.add, present)
    return min(present) if op == _MIN else max(present)


def coarse_cells(plan: RollupPlan, granularity: str, cells: Cells) -> Cells:
    """The cells of the rollup's `granularity` table that a batch's base `cells` add up to.

    Rows whose bucket floors to the same coarse bucket merge as upserts do (count and
    sum add, min/max keep the extreme, None is the identity), so the coarse table
    stays the re-bucketing of the base table at every commit. Per row, not per event:
    a batch has far fewer rows than events, and fewer buckets still (each floored once).
    The rows are grouped first and each measure is then folded over a group's column.
    """
    floor = _floors(granularity)
    floored: dict[datetime, datetime] = {}
    groups: dict[Key, list[list[Value]]] = {}
    for key, values in cells.items():
        bucket = key[0]
        coarse = floored.get(bucket)
        if coarse is None:
            coarse = floored[bucket] = floor(bucket)
        row = (coarse, *key[1:])
        members = groups.get(row)
        if members is None:
            groups[row] = [values]
        else:
            members.append(values)
    ops = [op for op, _ in plan.ops]
    out: Cells = {}
    for row, members in groups.items():
        if len(members) == 1:
            out[row] = list(members[0])
        else:
            out[row] = [_merged(op, column) for op, column in zip(ops, zip(*members, strict=True), strict=True)]
    return out


def table_cells(plan: RollupPlan, cells: Cells) -> dict[str, Cells]:
    """Every stored table's cells for one rollup's base `cells`, base table first, then coarser ones."""
    spec = plan.spec
    out = {spec.table: cells}
    source = cells
    for granularity in spec.coarse_granularities:  # each from the finer one: hour -> day reads fewer rows
        source = coarse_cells(plan, granularity, source)
        out[spec.table_for(granularity)] = source
    return out


def merge_cells(plan: RollupPlan, a: Cells, b: Cells) -> Cells:
    """`a` and `b` combined into a new mapping; neither input is changed."""
    out: Cells = {key: list(values) for key, values in a.items()}
    for key, values in b.items():
        mine = out.get(key)
        if mine is None:
            out[key] = list(values)
        else:
            out[key] = [_combine(op, old, new) for (op, _), old, new in zip(plan.ops, mine, values, strict=True)]
    return out


def merge(plans: Sequence[RollupPlan], a: Aggregates, b: Aggregates) -> Aggregates:
    """Two partial aggregates combined exactly, rollup by rollup."""
    return {p.name: merge_cells(p, a.get(p.name, {}), b.get(p.name, {})) for p in plans}
