"""`tally backfill ROLLUP [--from WHEN | --since WHEN]`: fill a new rollup's past from the topic, exactly once.

The live consumers record, per partition, the offset from which they applied the
rollup (`tally_rollup_starts`). A backfill applies that rollup alone to the
records in [from, start) of each partition, so the two never overlap. Its own
position is kept in `tally_offsets` under the group `backfill:<rollup>` and
advanced in the same transaction as its upserts, with the same fencing as the
live consumers: a crashed backfill resumes where it committed, a second one
running at once is fenced, and a finished one does nothing when run again.
Dead letters are skipped: the live consumers already sent them to the DLQ.
Batches go through the live consumers' Flusher, so the rollup's coarse tables
(`granularities`) are written with its base table, in the same transactions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.aggregate import RollupPlan, compile_rollups
from consumers.batch import TP, prepare
from consumers.decode import Record
from consumers.flush import Flusher
from consumers.offsets import read_offsets
from consumers.registry import registry_version
from core import kafka
from core.db import write_engine
from core.settings import Settings
from schemas.reltime import SPELLING, relative_seconds

log = logging.getLogger(__name__)
_READ_STARTS = text(
    "SELECT partition, start_offset FROM tally_rollup_starts WHERE group_id = :g AND rollup = :r AND topic = :t"
)
_FROM_OFFSETS = text(
    "INSERT INTO tally_offsets (group_id, topic, partition, next_offset) "
    "SELECT :g, :t, p, o FROM unnest(CAST(:ps AS integer[]), CAST(:os AS bigint[])) AS x(p, o) "
    "ON CONFLICT (group_id, topic, partition) DO NOTHING"
)


class BackfillError(RuntimeError):
    """A backfill that cannot run as asked; the message says what to do."""


@dataclass
class BackfillReport:
    rollup: str
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> [from, start)
    events: int = 0
    skipped_dead_letters: int = 0


def parse_since(value: str | None, now: datetime) -> int | None:
    """`earliest` (None), ISO 8601 with an offset, or relative (`-30s`, `-7d`), as epoch ms."""
    if value is None or value == "earliest":
        return None
    seconds = relative_seconds(value)
    if seconds is not None and seconds > 0:
        raise BackfillError(f"--from {value!r} is in the future: the past is filled from it ({SPELLING})")
    if seconds is not None:
        when = now + timedelta(seconds=seconds)
    else:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise BackfillError(f"--from {value!r} is not earliest, ISO 8601 with an offset or {SPELLING}") from None
        if when.tzinfo is None:
            raise BackfillError(f"--from {value!r} needs a UTC offset")
    return int(when.timestamp() * 1000)


async def _starts(
    engine: AsyncEngine, settings: Settings, rollup: str, partitions: Sequence[int], wait: float
) -> dict[int, int]:
    """Each partition's start offset, waiting for the live consumers to apply the rollup once everywhere."""
    deadline = time.monotonic() + wait
    while True:
        async with engine.connect() as conn:
            rows = await conn.execute(_READ_STARTS, {"g": settings.consumer_group, "r": rollup, "t": settings.topic})
            starts = {int(p): int(o) for p, o in rows.all()}
        missing = [p for p in partitions if p not in starts]
        if not missing:
            return starts
        if time.monotonic() >= deadline:
            raise BackfillError(
                f"the consumers have not applied {rollup} on partition(s) {missing} yet, so where the backfill "
                "must stop is not known: run consumers with the new rollups file (each partition needs one "
                "batch), then backfill again"
            )
        await asyncio.sleep(1.0)


async def _from_offsets(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    since_ms: int | None,
    starts: dict[int, int],
) -> dict[int, int]:
    if since_ms is None:
        first = await kafka.within(settings, consumer.beginning_offsets(tps), "reading the topic's first offsets")
        return {tp.partition: int(o) for tp, o in first.items()}
    found = await kafka.within(settings, consumer.offsets_for_times(dict.fromkeys(tps, since_ms)), "finding --from")
    return {tp.partition: (int(f.offset) if f is not None else starts[tp.partition]) for tp, f in found.items()}


async def backfill(settings: Settings, rollup: str, since: str | None, *, wait: float = 60.0) -> BackfillReport:
    specs = [s for s in settings.rollups if s.name == rollup]
    if not specs:
        raise BackfillError(f"rollup {rollup!r} is not in {settings.rollups_file}")
    since_ms = parse_since(since, datetime.now(UTC))
    plans = compile_rollups(specs)
    group = f"backfill:{rollup}"
    report = BackfillReport(rollup)
    async with AsyncExitStack() as stack:  # on the way out: the consumer, then the engine
        engine = write_engine(str(settings.postgres_url), pool_size=1, app="tally-backfill")
        stack.push_async_callback(engine.dispose)
        version = await registry_version(engine, settings.rollups)
        client = kafka.consumer(settings, group_id=None, client_id="tally-backfill")
        consumer = await stack.enter_async_context(kafka.started(settings, client))
        # The metadata of a topic this client never fetched:
        await kafka.within(settings, consumer._client.force_metadata_update(), "reading the topic list")
        partitions = sorted(consumer.partitions_for_topic(settings.topic) or ())
        if not partitions:
            raise BackfillError(f"topic {settings.topic} has no partitions: is Kafka the one the consumers use?")
        tps = [TopicPartition(settings.topic, p) for p in partitions]
        starts = await _starts(engine, settings, rollup, partitions, wait)
        froms = await _from_offsets(settings, consumer, tps, since_ms, starts)
        async with engine.begin() as conn:
            await conn.execute(
                _FROM_OFFSETS,
                {
                    "g": group,
                    "t": settings.topic,
                    "ps": partitions,
                    "os": [min(froms[p], starts[p]) for p in partitions],
                },
            )
        stored = await read_offsets(engine, group, [(settings.topic, p) for p in partitions])
        expected: dict[TP, int] = dict(stored)
        report.ranges = {p: (expected[(settings.topic, p)], starts[p]) for p in partitions}
        flusher = Flusher(engine, group, plans, version=version, record_starts=False)
        await _apply(settings, consumer, flusher, plans, expected, starts, report)
    return report


async def _apply(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    flusher: Flusher,
    plans: Sequence[RollupPlan],
    expected: dict[TP, int],
    starts: dict[int, int],
    report: BackfillReport,
) -> None:
    """Read and apply until every partition's position reaches its start."""
    remaining = {tp for tp, offset in expected.items() if offset < starts[tp[1]]}
    consumer.assign([TopicPartition(*tp) for tp in sorted(remaining)])
    for tp in remaining:
        consumer.seek(TopicPartition(*tp), expected[tp])
    quiet_since = time.monotonic()
    while remaining:
        polled = await kafka.within(
            settings, consumer.getmany(timeout_ms=500, max_records=settings.batch_max_records), "fetching records"
        )
        if polled:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > kafka.STEP_SECONDS:
            raise kafka.Unanswered(
                f"Kafka at {settings.kafka_bootstrap} sent no records for {kafka.STEP_SECONDS:g} s with "
                f"{len(remaining)} partition(s) short of the rollup's start: is it up, or did its retention "
                "delete them? (run the backfill again: it resumes)"
            )
        below: dict[TP, list[Record]] = {}
        for tp, records in polled.items():
            key = (tp.topic, tp.partition)
            below[key] = [r for r in records if r.offset < starts[tp.partition]]
            if len(below[key]) < len(records):  # reached the start: the live consumers took it from here
                remaining.discard(key)
        batch = prepare(below, expected, plans)
        if batch.advances:
            if not await flusher.flush(batch):
                raise BackfillError(
                    f"backfill of {report.rollup} was fenced: another backfill of it is running, "
                    "or a migrate changed the rollups"
                )
            for adv in batch.advances:
                expected[(adv.topic, adv.partition)] = adv.new
            report.events += batch.events
            report.skipped_dead_letters += len(batch.dead)
        for tp in list(remaining):
            if expected[tp] >= starts[tp[1]]:
                remaining.discard(tp)
        log.info("backfill %s: %d events applied; %d partition(s) to go", report.rollup, report.events, len(remaining))


async def run(settings: Settings, rollup: str, since: str | None, wait: float) -> None:
    """The CLI entry: print what was done."""
    settings.require("kafka_bootstrap", "postgres_url")
    report = await backfill(settings, rollup, since, wait=wait)
    ranges = ", ".join(f"{p}:[{a},{b})" for p, (a, b) in sorted(report.ranges.items()))
    print(
        f"backfilled {report.rollup}: {report.events} events applied from offsets {ranges}; "
        f"{report.skipped_dead_letters} dead letter(s) skipped (already in the DLQ)"
    )
