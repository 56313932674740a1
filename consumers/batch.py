"""Step 3: one poll -> one prepared batch (offset advances, aggregates, dead letters).

Pure but for the clock: rollups with a retention skip events whose bucket is past
it (consumers.aggregate.aggregate_retained), judged at `now_ms`, the wall clock
when the caller gives none. Those events are counted in
`tally_consumer_expired_events_total` here, when the batch is prepared.

The expected start offset of each partition is the one stored in Postgres. Records
below it were applied already (a fetch that raced a seek can return them again)
and are dropped here, so nothing is applied twice; a partition whose stored
offset is not known yet is left out of the batch until it is.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from consumers.aggregate import Aggregates, RollupPlan, aggregate_retained
from consumers.decode import DeadLetter, Record, decode
from consumers.dedup import Candidates
from consumers.validate import validate
from core.retention import expired_events

TP = tuple[str, int]  # (topic, partition); aiokafka's TopicPartition is such a tuple


@dataclass(frozen=True, slots=True)
class Advance:
    """Move a partition's stored offset from `expected` (the batch start) to `new` (last offset + 1)."""

    topic: str
    partition: int
    expected: int
    new: int


@dataclass(slots=True)
class PreparedBatch:
    advances: list[Advance] = field(default_factory=list)
    aggregates: Aggregates = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    events: int = 0  # events counted into rollups
    records: int = 0  # records applied (envelopes, good or bad)
    first_timestamp_ms: dict[TP, int] = field(default_factory=dict)  # per partition, its first record's
    gaps: dict[TP, tuple[int, int]] = field(default_factory=dict)  # offsets [a, b) absent from the log
    unknown: list[TP] = field(default_factory=list)  # partitions polled before their offset was loaded
    candidates: Candidates | None = None  # with de-duplication on: the events and their ids
    duplicates: int = 0  # events not counted because their id was seen (set by the flush)
    expired: dict[str, int] = field(default_factory=dict)  # per rollup: events skipped, past its retention


def prepare(
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
    batch.aggregates, batch.expired = aggregate_retained(plans, events, now)
    for rollup, skipped in batch.expired.items():
        expired_events.labels(rollup).inc(skipped)
    if dedup:
        batch.candidates = Candidates.of(events)
    return batch
