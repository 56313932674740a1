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
  the path; other values are ignored and leave the measure None if none is numeric.
Two guards keep one odd event from wedging a partition (Postgres would refuse the
row forever): NUL characters, which `text` cannot hold, become U+FFFD, and a
dimension value is cut (at a character boundary) to its share of
`MAX_KEY_BYTES`, so a row key always fits in a btree index entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from typing import Any, Final

from schemas.events import lookup
from schemas.rollups import GRANULARITY_MS, RollupSpec, dimension_text, expiry_cutoff_ms

# Wide enough that adding any two JSON numbers is exact.
EXACT: Final = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Postgres btree entries hold at most ~2700 bytes; the dimension values of one key stay below this.
MAX_KEY_BYTES: Final = 2000
MIN_DIMENSION_BYTES: Final = 64

Key = tuple[Any, ...]  # (bucket datetime, *dimension strings)
Value = int | Decimal | None  # count -> int; sum/min/max -> Decimal or None
Cells = dict[Key, list[Value]]  # measure values in the spec's measure order
Aggregates = dict[str, Cells]  # rollup name -> cells

_COUNT, _SUM, _MIN, _MAX = 0, 1, 2, 3
_OPS: Final = {"count": _COUNT, "sum": _SUM, "min": _MIN, "max": _MAX}


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
    value_paths: tuple[tuple[str, ...], ...]  # distinct numeric paths, each looked up once per event
    ops: tuple[tuple[int, int], ...]  # per measure: (op code, index into value_paths or -1)

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
    )


def compile_rollups(specs: Iterable[RollupSpec]) -> tuple[RollupPlan, ...]:
    return tuple(compile_rollup(s) for s in specs)


def _combine(op: int, old: Value, new: Value) -> Value:
    """One measure merged: None is the identity; count/sum add; min/max keep the extreme."""
    if new is None:
        return old
    if old is None:
        return new
    if op == _COUNT:
        return old + new
    if op == _SUM:
        return EXACT.add(old, new)
    if op == _MIN:
        return new if new < old else old
    return new if new > old else old


def aggregate_rollup(plan: RollupPlan, events: Iterable[dict[str, Any]], cells: Cells | None = None) -> Cells:
    """Add `events` into `cells` (a new mapping if None) for one rollup and return it.

    The hot loop of the consumer: paths are pre-split getters, the common case
    (a short str dimension) skips `stringify`/`fit`, and each numeric path is
    read and converted once per event however many measures use it.
    """
    out: Cells = {} if cells is None else cells
    buckets: dict[int, datetime] = {}
    width, cap = plan.width_ms, plan.dimension_bytes
    short = cap // 4  # a str this short fits in `cap` bytes whatever its characters
    where = [(_getter(keys), allowed) for keys, allowed in plan.where]
    dims = [_getter(keys) for keys in plan.dimensions]
    values = [_getter(keys) for keys in plan.value_paths]
    count_at = [i for i, (op, _) in enumerate(plan.ops) if op == _COUNT]
    numeric = [(i, op, j) for i, (op, j) in enumerate(plan.ops) if op != _COUNT]
    for event in events:
        if where and not _matches(event, where):
            continue
        ts: int = event["ts"]
        start = ts - ts % width
        bucket = buckets.get(start)
        if bucket is None:
            bucket = buckets[start] = EPOCH + timedelta(milliseconds=start)
        parts: list[Any] = [bucket]
        for get in dims:
            v = get(event)
            parts.append(v if type(v) is str and len(v) <= short and "\x00" not in v else fit(stringify(v), cap))
        key = tuple(parts)
        cell = out.get(key)
        if cell is None:
            cell = out[key] = plan.empty()
        for i in count_at:
            cell[i] += 1  # type: ignore[operator]
        if numeric:
            numbers = [to_decimal(get(event)) for get in values]
            for i, op, j in numeric:
                number = numbers[j]
                if number is not None:
                    cell[i] = _combine(op, cell[i], number)
    return out


def _getter(keys: tuple[str, ...]) -> Callable[[dict[str, Any]], Any]:
    """`lookup(event, keys)` specialised for one- and two-step paths (nearly all of them)."""
    if len(keys) == 1:
        (k,) = keys
        return lambda event: event.get(k)
    if len(keys) == 2:
        k0, k1 = keys

        def two(event: dict[str, Any]) -> Any:
            inner = event.get(k0)
            return inner.get(k1) if isinstance(inner, dict) else None

        return two
    return lambda event: lookup(event, keys)


def _matches(event: dict[str, Any], where: list[tuple[Callable[[dict[str, Any]], Any], frozenset[str]]]) -> bool:
    for get, allowed in where:
        v = get(event)
        if (v if type(v) is str else stringify(v)) not in allowed:
            return False
    return True


def aggregate(
    plans: Sequence[RollupPlan], events: Sequence[dict[str, Any]], *, now_ms: int | None = None
) -> Aggregates:
    """Every rollup's cells for `events` (validated, normalized events).

    A rollup with a retention skips events whose bucket is past it at `now_ms`,
    read from the wall clock if not given (the only clock this module reads).
    """
    if all(plan.spec.retention is None for plan in plans):
        return {plan.name: aggregate_rollup(plan, events) for plan in plans}
    return aggregate_retained(plans, events, time.time_ns() // 1_000_000 if now_ms is None else now_ms)[0]


def aggregate_retained(
    plans: Sequence[RollupPlan], events: Sequence[dict[str, Any]], now_ms: int
) -> tuple[Aggregates, dict[str, int]]:
    """`aggregate`, except that a rollup with a retention skips events whose bucket is already past it.

    Such a bucket may have been deleted by the retention job (core.retention);
    counting a late event into it would bring back a row holding only that
    event. Returns the aggregates and, per rollup, how many events it would have
    counted but skipped. The common batch has no event that old and pays one
    pass over the timestamps.
    """
    out: Aggregates = {}
    expired: dict[str, int] = {}
    oldest = min((e["ts"] for e in events), default=None)
    for plan in plans:
        cutoff = plan.cutoff_ms(now_ms)
        if cutoff is None or oldest is None or oldest >= cutoff:
            out[plan.name] = aggregate_rollup(plan, events)
            continue
        kept = [e for e in events if e["ts"] >= cutoff]
        where = [(_getter(keys), allowed) for keys, allowed in plan.where]
        skipped = sum(1 for e in events if e["ts"] < cutoff and (not where or _matches(e, where)))
        out[plan.name] = aggregate_rollup(plan, kept)
        if skipped:
            expired[plan.name] = skipped
    return out, expired


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
