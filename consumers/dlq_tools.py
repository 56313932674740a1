"""`tally dlq inspect` and `tally dlq replay`: read the dead-letter topic; re-submit dead letters after a fix.

`inspect` prints the most recent dead letters: where each sits in the DLQ, when it
was written, the `tally-error` reason, the record it came from (the
`tally-source-*` headers) and a short preview of the value.

`replay` re-produces dead letters to the event topic as they are (same value, so
an envelope keeps its event_ids; same key; the original headers without Tally's
dead-letter ones, plus `tally-replay-of: <dlq topic>/<partition>/<offset>`), so the
consumers count them like any other record, or dead-letter them again if the fix
did not make them readable. Its position in each DLQ partition is kept in
`tally_offsets` under the group `tally-dlq-replay` and advanced after the broker
acknowledged (acks=all) a batch, with the consumers' fencing (the update must find
the position the batch started from), so a re-run resumes and never re-submits
what a finished run did. A crash between the acks and the position update
re-submits that one batch on the next run: replay is at-least-once, and event_id
de-duplication (TALLY_DEDUP) makes such a repeat count once.

Letters that already came back from a replay (they carry `tally-replay-of`) are
not sent again unless `--include-replayed`, so a record the fix did not cure is not
bounced between the topics by every run; they have a position of their own
(`tally-dlq-replay-again`), so a later `--include-replayed` run, after a further
fix, still sends each of them once. Passed over for good (the positions move past
them): letters before `--since`, and truncated letters (`tally-truncated-from`:
only their head was kept).
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.decode import (
    REPLAY_HEADER,
    SOURCE_OFFSET_HEADER,
    SOURCE_PARTITION_HEADER,
    SOURCE_TOPIC_HEADER,
)
from consumers.dlq import TRUNCATED_HEADER
from core import kafka
from core.db import write_engine
from core.settings import Settings
from schemas.envelope import ERROR_HEADER
from schemas.reltime import SPELLING, relative_seconds

REPLAY_GROUP = "tally-dlq-replay"  # the position among first-time dead letters
AGAIN_GROUP = "tally-dlq-replay-again"  # among those that came back from a replay (--include-replayed)
PREVIEW_CHARS = 120
FETCH_TIMEOUT = kafka.STEP_SECONDS  # no answer from the broker for this long is an error, not a hang
_DEAD_LETTER_HEADERS = frozenset(
    {ERROR_HEADER, SOURCE_TOPIC_HEADER, SOURCE_PARTITION_HEADER, SOURCE_OFFSET_HEADER, TRUNCATED_HEADER, REPLAY_HEADER}
)

_ENSURE = text(
    "INSERT INTO tally_offsets (group_id, topic, partition, next_offset) "
    "SELECT :g, :t, p, 0 FROM unnest(CAST(:ps AS integer[])) AS p "
    "ON CONFLICT (group_id, topic, partition) DO NOTHING"
)
_READ = text("SELECT partition, next_offset FROM tally_offsets WHERE group_id = :g AND topic = :t")
_ADVANCE = text(
    "UPDATE tally_offsets SET next_offset = :new, updated_at = now() "
    "WHERE group_id = :g AND topic = :t AND partition = :p AND next_offset = :expected"
)


class DlqError(RuntimeError):
    """A DLQ command that cannot do what was asked; the message says why."""


# --- Pure parts: parsing `--since`, reading headers, formatting, what to replay. ---


def parse_since(value: str | None, now: datetime) -> int | None:
    """None, ISO 8601 with an offset, or relative (`-30s`, `-15m`, `-1h`, `-7d`, `-2w`), as epoch ms."""
    if value is None:
        return None
    seconds = relative_seconds(value.strip())
    if seconds is not None and seconds > 0:
        raise DlqError(f"--since {value!r} is in the future: dead letters are in the past ({SPELLING})")
    if seconds is not None:
        when = now + timedelta(seconds=seconds)
    else:
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            raise DlqError(f"--since {value!r} is not ISO 8601 with an offset or {SPELLING}") from None
        if when.tzinfo is None or when.utcoffset() is None:
            raise DlqError(f"--since {value!r} needs a UTC offset (e.g. 2026-11-25T13:00:00Z)")
    return int(when.timestamp() * 1000)


@dataclass(frozen=True, slots=True)
class Letter:
    """One record of the DLQ topic."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, record: Any) -> Letter:
        return cls(
            record.partition, record.offset, record.timestamp, record.key, record.value, tuple(record.headers or ())
        )

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("utf-8", "replace")
        return None

    @property
    def error(self) -> str:
        return self.header(ERROR_HEADER) or "(no tally-error header)"

    @property
    def source(self) -> str:
        topic, partition, offset = (
            self.header(h) for h in (SOURCE_TOPIC_HEADER, SOURCE_PARTITION_HEADER, SOURCE_OFFSET_HEADER)
        )
        return f"{topic or '?'}[{partition or '?'}]@{offset or '?'}"


def format_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def preview(value: bytes | None, chars: int = PREVIEW_CHARS) -> str:
    """The value's head on one line (UTF-8, undecodable bytes as escapes) and its size."""
    if value is None:
        return "(no value)"
    head = value[: chars * 4].decode("utf-8", "backslashreplace")
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in head)  # one line, control chars escaped
    cut = len(shown) > chars or len(value) > chars * 4
    return f"{shown[:chars]}{'…' if cut else ''} ({len(value)} bytes)"


def describe(letter: Letter) -> str:
    """Three lines: position, time and origin; the reason; the value."""
    lines = [f"{letter.partition}:{letter.offset}  {format_time(letter.timestamp_ms)}  from {letter.source}"]
    for name in (REPLAY_HEADER, TRUNCATED_HEADER):
        found = letter.header(name)
        if found is not None:
            lines[0] += f"  {name}: {found}"
    lines.append(f"    error: {letter.error}")
    lines.append(f"    value: {preview(letter.value)}")
    return "\n".join(lines)


def as_json(letter: Letter) -> bytes:
    return orjson.dumps(
        {
            "partition": letter.partition,
            "offset": letter.offset,
            "timestamp": format_time(letter.timestamp_ms),
            "error": letter.header(ERROR_HEADER),
            "source_topic": letter.header(SOURCE_TOPIC_HEADER),
            "source_partition": letter.header(SOURCE_PARTITION_HEADER),
            "source_offset": letter.header(SOURCE_OFFSET_HEADER),
            "replay_of": letter.header(REPLAY_HEADER),
            "truncated_from": letter.header(TRUNCATED_HEADER),
            "value_bytes": None if letter.value is None else len(letter.value),
            "value_preview": None if letter.value is None else preview(letter.value).rsplit(" (", 1)[0],
        }
    )


def skip_reason(letter: Letter, since_ms: int | None, include_replayed: bool) -> str | None:
    """Why `letter` is not replayed, or None to replay it."""
    if since_ms is not None and letter.timestamp_ms < since_ms:
        return "before --since"
    if letter.header(TRUNCATED_HEADER) is not None:
        return "truncated (only its head was kept)"
    if not include_replayed and letter.header(REPLAY_HEADER) is not None:
        return "came back from an earlier replay (--include-replayed to send again)"
    return None


def replay_headers(letter: Letter, dlq_topic: str) -> list[tuple[str, bytes]]:
    """The original record's headers (Tally's dead-letter ones removed) and where this replay came from."""
    kept = [(k, v) for k, v in letter.headers if k not in _DEAD_LETTER_HEADERS]
    return [*kept, (REPLAY_HEADER, f"{dlq_topic}/{letter.partition}/{letter.offset}".encode())]


# --- Reading the DLQ topic. ---


@asynccontextmanager
async def _open(settings: Settings, client_id: str) -> AsyncIterator[tuple[AIOKafkaConsumer, list[TopicPartition]]]:
    """A consumer of the DLQ topic (stopped, bounded, at the end) and the topic's partitions."""
    async with kafka.started(settings, kafka.consumer(settings, group_id=None, client_id=client_id)) as consumer:
        await kafka.within(settings, consumer._client.force_metadata_update(), "reading the topic list")
        partitions = sorted(consumer.partitions_for_topic(settings.dlq_topic) or ())
        if not partitions:
            raise DlqError(f"the DLQ topic {settings.dlq_topic} does not exist (run `tally migrate`)")
        yield consumer, [TopicPartition(settings.dlq_topic, p) for p in partitions]


async def _starts(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    tps: Sequence[TopicPartition],
    since_ms: int | None,
    floor: dict[int, int],
) -> dict[TopicPartition, int]:
    """Where to read from: past `floor` (a stored position), the log start and, if found, `since`."""
    begin = await kafka.within(settings, consumer.beginning_offsets(list(tps)), "reading the DLQ's first offsets")
    out = {tp: max(int(begin[tp]), floor.get(tp.partition, 0)) for tp in tps}
    if since_ms is not None:
        found = await kafka.within(
            settings, consumer.offsets_for_times(dict.fromkeys(tps, since_ms)), "finding offsets for --since"
        )
        for tp, hit in found.items():
            if hit is not None:  # None: nothing at or after `since` (the filter skips what is there)
                out[tp] = max(out[tp], int(hit.offset))
    return out


async def scan(
    settings: Settings, consumer: AIOKafkaConsumer, starts: dict[TopicPartition, int], max_records: int
) -> AsyncGenerator[dict[TopicPartition, list[Letter]], None]:
    """Batches of letters from `starts` up to each partition's end as of the first fetch.

    The end is the fetch highwater (Tansu's `end_offsets()` is wrong); letters written
    after it (a replay's own dead letters, say) are left for the next run. No
    `unsubscribe()` at the end: followed by `stop()` with no fetch in flight, it hangs
    (aiokafka issue 983), and `stop()` drops the assignment anyway.
    """
    tps = sorted(starts, key=lambda tp: tp.partition)
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, starts[tp])
    end: dict[TopicPartition, int] = {}
    remaining = set(tps)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FETCH_TIMEOUT
    while remaining:
        polled = await kafka.within(
            settings, consumer.getmany(*remaining, timeout_ms=500, max_records=max_records), "fetching dead letters"
        )
        batch: dict[TopicPartition, list[Letter]] = {}
        for tp in list(remaining):
            highwater = consumer.highwater(tp)
            if highwater is not None:
                end.setdefault(tp, highwater)
        for tp, records in polled.items():
            if tp not in end:
                continue
            letters = [Letter.of(r) for r in records if r.offset < end[tp]]
            if letters:
                batch[tp] = letters
            if len(letters) < len(records):
                remaining.discard(tp)
        for tp in list(remaining):
            if tp in end and await kafka.within(settings, consumer.position(tp), "reading a position") >= end[tp]:
                remaining.discard(tp)
        if batch:
            deadline = loop.time() + FETCH_TIMEOUT
            yield batch
        elif remaining and loop.time() > deadline:
            waiting = sorted(tp.partition for tp in remaining)
            raise kafka.Unanswered(
                f"Kafka at {settings.kafka_bootstrap} sent nothing for DLQ partition(s) {waiting} "
                f"in {FETCH_TIMEOUT:g} s: is it up?"
            )


# --- inspect ---


async def inspect(settings: Settings, *, limit: int, since: str | None, json_lines: bool) -> None:
    """Print the last `limit` dead letters (at or after `since`), oldest first."""
    settings.require("kafka_bootstrap")
    since_ms = parse_since(since, datetime.now(UTC))
    newest: dict[int, deque[Letter]] = {}  # each partition's newest `limit`: the newest overall are among them
    total = 0
    async with _open(settings, "tally-dlq-inspect") as (consumer, tps):
        starts = await _starts(settings, consumer, tps, since_ms, {})
        async with aclosing(scan(settings, consumer, starts, settings.batch_max_records)) as batches:
            async for batch in batches:
                for letters in batch.values():
                    for letter in letters:
                        if since_ms is None or letter.timestamp_ms >= since_ms:
                            total += 1
                            newest.setdefault(letter.partition, deque(maxlen=max(limit, 0))).append(letter)
    merged = sorted((x for d in newest.values() for x in d), key=lambda x: (x.timestamp_ms, x.partition, x.offset))
    shown = merged[-limit:] if limit > 0 else []
    if json_lines:
        for letter in shown:
            sys.stdout.buffer.write(as_json(letter) + b"\n")
        sys.stdout.flush()
        return
    when = f" since {format_time(since_ms)}" if since_ms is not None else ""
    print(f"{settings.dlq_topic}: {total} dead letter(s){when}; the last {len(shown)}, oldest first")
    for letter in shown:
        print(describe(letter))


# --- replay ---


@dataclass
class ReplayReport:
    replayed: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> [from, to) read by this run

    def summary(self, dry_run: bool, dlq_topic: str, topic: str) -> str:
        verb = "would replay" if dry_run else "replayed"
        ranges = ", ".join(f"{p}:[{a},{b})" for p, (a, b) in sorted(self.ranges.items()) if b > a)
        skipped = "; ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        line = f"{verb} {self.replayed} dead letter(s) from {dlq_topic} to {topic} (offsets {ranges or 'none'})"
        return f"{line}; skipped: {skipped}" if skipped else line


Position = dict[tuple[str, int], int]  # (group, partition) -> next DLQ offset to consider


async def _positions(engine: AsyncEngine, dlq_topic: str, partitions: Iterable[int], *, create: bool) -> Position:
    """Both positions of every partition (0 where none is stored; created at 0 unless a dry run)."""
    wanted = sorted(partitions)
    async with engine.begin() as conn:
        if create:
            for group in (REPLAY_GROUP, AGAIN_GROUP):
                await conn.execute(_ENSURE, {"g": group, "t": dlq_topic, "ps": wanted})
        found = {
            (group, int(p)): int(o)
            for group in (REPLAY_GROUP, AGAIN_GROUP)
            for p, o in (await conn.execute(_READ, {"g": group, "t": dlq_topic})).all()
        }
    return {(g, p): found.get((g, p), 0) for g in (REPLAY_GROUP, AGAIN_GROUP) for p in wanted}


async def _advance(engine: AsyncEngine, dlq_topic: str, moves: dict[tuple[str, int], tuple[int, int]]) -> None:
    """Move positions from where this run left them to their new value, all or nothing; fenced otherwise."""
    async with engine.begin() as conn:
        for (group, partition), (expected, new) in sorted(moves.items()):
            params = {"g": group, "t": dlq_topic, "p": partition, "expected": expected, "new": new}
            if (await conn.execute(_ADVANCE, params)).rowcount != 1:
                raise DlqError(
                    f"the replay position of {dlq_topic}[{partition}] moved under this run: another "
                    "`tally dlq replay` is running (the last batch was sent; event_id de-duplication counts it once)"
                )


async def _produce(producer: AIOKafkaProducer, topic: str, letters: Sequence[Letter], dlq_topic: str) -> None:
    """Send every letter and wait until the broker acknowledged all of them (acks=all)."""
    futures = [
        await producer.send(topic, letter.value, key=letter.key, headers=replay_headers(letter, dlq_topic))
        for letter in letters
    ]
    await asyncio.gather(*futures)


def _group_of(letter: Letter) -> str:
    """Which position accounts for `letter`: first-time dead letters, or those that came back from a replay."""
    return AGAIN_GROUP if letter.header(REPLAY_HEADER) is not None else REPLAY_GROUP


async def replay(
    settings: Settings, *, since: str | None, dry_run: bool, include_replayed: bool, out: Any = None
) -> ReplayReport:
    """Re-submit dead letters past the stored positions (module docstring); returns what was done."""
    out = out or sys.stdout
    since_ms = parse_since(since, datetime.now(UTC))
    groups = (REPLAY_GROUP, AGAIN_GROUP) if include_replayed else (REPLAY_GROUP,)
    report = ReplayReport()
    async with AsyncExitStack() as stack:  # on the way out: the producer, the consumer, the engine
        engine = write_engine(str(settings.postgres_url), pool_size=1, app="tally-dlq-replay")
        stack.push_async_callback(engine.dispose)
        consumer, tps = await stack.enter_async_context(_open(settings, "tally-dlq-replay"))
        position = await _positions(engine, settings.dlq_topic, (tp.partition for tp in tps), create=not dry_run)
        floor = {tp.partition: min(position[(g, tp.partition)] for g in groups) for tp in tps}
        starts = await _starts(settings, consumer, tps, since_ms, floor)
        report.ranges = {tp.partition: (start, start) for tp, start in starts.items()}
        producer = None
        if not dry_run:
            producer = kafka.producer(settings, client_id="tally-dlq-replay")
            await stack.enter_async_context(kafka.started(settings, producer))
        async with aclosing(scan(settings, consumer, starts, settings.batch_max_records)) as batches:
            async for batch in batches:
                send: list[Letter] = []
                moves: dict[tuple[str, int], tuple[int, int]] = {}
                for tp, letters in batch.items():
                    for letter in letters:
                        if letter.offset < position[(_group_of(letter), tp.partition)]:
                            continue  # an earlier run accounted for it (read again for the other position)
                        why = skip_reason(letter, since_ms, include_replayed)
                        if why is None:
                            send.append(letter)
                        else:
                            report.skipped[why] += 1
                    end = letters[-1].offset + 1
                    for group in groups:
                        if end > position[(group, tp.partition)]:
                            moves[(group, tp.partition)] = (position[(group, tp.partition)], end)
                    report.ranges[tp.partition] = (report.ranges[tp.partition][0], end)
                if producer is None:
                    for letter in send:
                        print(describe(letter), file=out)
                else:
                    if send:
                        await kafka.within(
                            settings,
                            _produce(producer, settings.topic, send, settings.dlq_topic),
                            f"acknowledging {len(send)} replayed record(s)",
                            seconds=settings.produce_timeout_seconds * 2 + 1,
                        )
                    await _advance(engine, settings.dlq_topic, moves)
                for key, (_, new) in moves.items():
                    position[key] = new
                report.replayed += len(send)
        # Skipped ahead with nothing read (--since, or the log start moved): record it for the next run.
        jumps = {
            (g, tp.partition): (position[(g, tp.partition)], start)
            for tp, start in starts.items()
            for g in groups
            if start > position[(g, tp.partition)]
        }
        if jumps and not dry_run:
            await _advance(engine, settings.dlq_topic, jumps)
    return report


async def replay_command(settings: Settings, *, since: str | None, dry_run: bool, include_replayed: bool) -> None:
    """The CLI entry: replay (or list), print a summary."""
    settings.require("kafka_bootstrap", "postgres_url")
    report = await replay(settings, since=since, dry_run=dry_run, include_replayed=include_replayed)
    print(report.summary(dry_run, settings.dlq_topic, settings.topic))
