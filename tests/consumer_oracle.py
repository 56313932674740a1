"""The consumer's pure steps as they were before the columnar rewrite (issue 17): the oracle.

`prepare_oracle` decodes every record with orjson, validates each event as a dict and
aggregates event by event; tests/unit/test_consumer_columns.py holds the msgspec views
and the columnar aggregation (consumers.view, consumers.aggregate) to it. Kept
verbatim but for names; do not optimise it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from consumers.aggregate import _COUNT, EPOCH, Aggregates, Cells, RollupPlan, _combine, fit, stringify, to_decimal
from consumers.batch import Advance, PreparedBatch
from consumers.decode import Record, decode
from consumers.dedup import dedup_key
from consumers.validate import validate
from schemas.events import lookup


class OracleCandidates:
    """The old Candidates.of: one dedup_key call per event dict."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.keys = [dedup_key(e.get("event_id")) for e in events]
        self.distinct = list(dict.fromkeys(k for k in self.keys if k is not None))
        keyed = len(self.keys) - self.keys.count(None)
        self.repeats = len(self.distinct) < keyed


def aggregate_rollup_oracle(plan: RollupPlan, events: Iterable[dict[str, Any]], cells: Cells | None = None) -> Cells:
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


def aggregate_retained_oracle(
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
            out[plan.name] = aggregate_rollup_oracle(plan, events)
            continue
        kept = [e for e in events if e["ts"] >= cutoff]
        where = [(_getter(keys), allowed) for keys, allowed in plan.where]
        skipped = sum(1 for e in events if e["ts"] < cutoff and (not where or _matches(e, where)))
        out[plan.name] = aggregate_rollup_oracle(plan, kept)
        if skipped:
            expired[plan.name] = skipped
    return out, expired


def prepare_oracle(
    polled: Mapping[Any, Sequence[Record]],
    expected: Mapping[Any, int],
    plans: Sequence[RollupPlan],
    *,
    dedup: bool = False,
    now_ms: int | None = None,
) -> PreparedBatch:
    """Everything one Postgres transaction needs for this poll (and, with `dedup`, the events' ids)."""
    batch = PreparedBatch()
    events: list[dict[str, Any]] = []
    for tp in sorted(polled):
        start = expected.get(tp)
        if start is None:
            batch.unknown.append(tp)
            continue
        records = [r for r in polled[tp] if r.offset >= start]
        if not records:
            continue
        first = records[0]
        if first.offset > start:
            batch.gaps[tp] = (start, first.offset)
        batch.advances.append(Advance(first.topic, first.partition, start, records[-1].offset + 1))
        if first.timestamp is not None and first.timestamp >= 0:
            batch.first_timestamp_ms[tp] = first.timestamp
        batch.records += len(records)
        for record in records:
            raw, dead = decode(record)
            if dead is not None:
                batch.dead.append(dead)
                continue
            good, bad = validate(record, raw)
            events.extend(good)
            batch.dead.extend(bad)
    batch.events = len(events)
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    batch.aggregates, batch.expired = aggregate_retained_oracle(plans, events, now)
    if dedup:
        batch.candidates = OracleCandidates(events)
    return batch
