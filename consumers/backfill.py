"""`tally backfill ROLLUP [--from WHEN]`: fill a new rollup's past from the topic, exactly once.

The live consumers record, per partition, the offset from which they applied the
rollup (`tally_rollup_starts`). A backfill applies that rollup alone to the
records in [from, start) of each partition, so the two never overlap. Its own
position is kept in `tally_offsets` under the group `backfill:<rollup>` and
advanced in the same transaction as its upserts, with the same fencing as the
live consumers: a crashed backfill resumes where it committed, a second one
running at once is fenced, and a finished one does nothing when run again.
Dead letters are skipped: the live consumers already sent them to the DLQ.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
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

log = logging.getLogger(__name__)
_RELATIVE = re.compile(r"^-(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
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
    """`earliest` (None), ISO 8601 with an offset, or relative (`-7d`), as epoch ms."""
    if value is None or value == "earliest":
        return None
    match = _RELATIVE.match(value)
    if match:
        when = now - timedelta(**{_UNITS[match[2]]: int(match[1])})
    else:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise BackfillError(f"--from {value!r} is not earliest, ISO 8601 or relative like -7d") from None
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
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], since_ms: int | None, starts: dict[int, int]
) -> dict[int, int]:
    if since_ms is None:
        return {tp.partition: int(o) for tp, o in (await consumer.beginning_offsets(tps)).items()}
    found = await consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
    return {tp.partition: (int(f.offset) if f is not None else starts[tp.partition]) for tp, f in found.items()}


async def backfill(settings: Settings, rollup: str, since: str | None, *, wait: float = 60.0) -> BackfillReport:
    specs = [s for s in settings.rollups if s.name == rollup]
    if not specs:
        raise BackfillError(f"rollup {rollup!r} is not in {settings.rollups_file}")
    since_ms = parse_since(since, datetime.now(UTC))
    plans = compile_rollups(specs)
    group = f"backfill:{rollup}"
    engine = write_engine(str(settings.postgres_url), pool_size=1, app="tally-backfill")
    consumer = kafka.consumer(settings, group_id=None, client_id="tally-backfill")
    report = BackfillReport(rollup)
    try:
        version = await registry_version(engine, settings.rollups)
        await consumer.start()
        await consumer._client.force_metadata_update()  # partitions of a topic this client never fetched
        partitions = sorted(consumer.partitions_for_topic(settings.topic) or ())
        if not partitions:
            raise BackfillError(f"topic {settings.topic} has no partitions: is Kafka the one the consumers use?")
        tps = [TopicPartition(settings.topic, p) for p in partitions]
        starts = await _starts(engine, settings, rollup, partitions, wait)
        froms = await _from_offsets(consumer, tps, since_ms, starts)
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
        await _apply(consumer, flusher, plans, expected, starts, settings.batch_max_records, report)
    finally:
        await consumer.stop()
        await engine.dispose()
    return report


async def _apply(
    consumer: AIOKafkaConsumer,
    flusher: Flusher,
    plans: Sequence[RollupPlan],
    expected: dict[TP, int],
    starts: dict[int, int],
    max_records: int,
    report: BackfillReport,
) -> None:
    """Read and apply until every partition's position reaches its start."""
    remaining = {tp for tp, offset in expected.items() if offset < starts[tp[1]]}
    consumer.assign([TopicPartition(*tp) for tp in sorted(remaining)])
    for tp in remaining:
        consumer.seek(TopicPartition(*tp), expected[tp])
    while remaining:
        polled = await consumer.getmany(timeout_ms=500, max_records=max_records)
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


async def run(settings: Settings, rollup: str, since: str | None, wait: float) -> int:
    """The CLI entry: print what was done; exit status 0 or 2."""
    settings.require("kafka_bootstrap", "postgres_url")
    try:
        report = await backfill(settings, rollup, since, wait=wait)
    except BackfillError as exc:
        print(f"tally backfill: {exc}")
        return 2
    ranges = ", ".join(f"{p}:[{a},{b})" for p, (a, b) in sorted(report.ranges.items()))
    print(
        f"backfilled {report.rollup}: {report.events} events applied from offsets {ranges}; "
        f"{report.skipped_dead_letters} dead letter(s) skipped (already in the DLQ)"
    )
    return 0
