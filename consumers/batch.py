"""Step 3: polls -> one prepared batch (offset advances, aggregates, dead letters).

Records are read as views (consumers.view: decode and validate in one msgspec call, the
general way for anything odd) and aggregated column by column (consumers.aggregate). A
batch may grow over several polls (`into`), which the pipelined runner does while the
batch before it commits.

Pure but for the clock: rollups with a retention skip events whose bucket is past
it (consumers.aggregate.aggregate_retained), judged at `now_ms`, the wall clock
when the caller gives none. Those events are counted in
`tally_consumer_expired_events_total` here, when the batch is prepared.

The expected start offset of each partition is the one stored in Postgres (or where the
batches before this one end). Records
below it were applied already (a fetch that raced a seek can return them again)
and are dropped here, so nothing is applied twice; a partition whose stored
offset is not known yet is left out of the batch until it is.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from consumers.aggregate import Aggregates, RollupPlan, aggregate_retained, plan_keys
from consumers.decode import DeadLetter, Record
from consumers.dedup import Candidates
from consumers.view import View, reader
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
    request_ids: dict[str, None] = field(default_factory=dict)  # ingest request ids, kept only for debug logs
    changed: tuple[str, ...] = ()  # rollups the flush wrote cells to (after any dedup claim), set by it

    def extend(self, advance: Advance) -> None:
        """Add a partition's advance; one that continues this batch's advance of it extends that one."""
        for i, mine in enumerate(self.advances):
            if (mine.topic, mine.partition) == (advance.topic, advance.partition):
                self.advances[i] = Advance(mine.topic, mine.partition, mine.expected, advance.new)
                return
        self.advances.append(advance)

    def ends(self) -> dict[TP, int]:
        """Where this batch leaves each partition it advances: the next poll's expected offsets."""
        return {(a.topic, a.partition): a.new for a in self.advances}


def prepare(
    polled: Mapping[Any, Sequence[Record]],
    expected: Mapping[Any, int],
    plans: Sequence[RollupPlan],
    *,
    dedup: bool = False,
    now_ms: int | None = None,
    into: PreparedBatch | None = None,
) -> PreparedBatch:
    """Everything one Postgres transaction needs for this poll (and, with `dedup`, the events' ids).

    With `into`, the poll is added to a batch prepared from earlier polls (whose ends must be
    `expected` for the partitions they hold): the batch then covers both, as if polled at once.
    """
    batch = PreparedBatch() if into is None else into
    read = reader(plan_keys(plans)).read
    events: list[View] = []
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
            batch.gaps.setdefault(tp, (start, first.offset))
        batch.extend(Advance(first.topic, first.partition, start, records[-1].offset + 1))
        if first.timestamp is not None and first.timestamp >= 0:
            batch.first_timestamp_ms.setdefault(tp, first.timestamp)
        batch.records += len(records)
        for record in records:
            good, dead = read(record)
            events.extend(good)
            if dead:
                batch.dead.extend(dead)
    batch.events += len(events)
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    _, expired = aggregate_retained(plans, events, now, into=batch.aggregates)
    for rollup, skipped in expired.items():
        batch.expired[rollup] = batch.expired.get(rollup, 0) + skipped
        expired_events.labels(rollup).inc(skipped)
    if dedup:
        found = Candidates.of(events)
        batch.candidates = found if batch.candidates is None else batch.candidates.joined(found)
    return batch
