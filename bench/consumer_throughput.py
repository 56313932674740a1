"""Consumer throughput on two workload shapes, each beside what bounds it, measured in the same run.

    .venv/bin/python -m bench.consumer_throughput [--live-events 600000] [--spread-events 300000]
        [--batch 100] [--processes 2] [--dedup-shapes live spread] [--limit-runs 2] [--no-dedup-limits]
        [--read-repeats 3] [--no-fsync] [--json out.json]

(`measure()` returns the figures, for bench.suite.)

Shapes (demo events, core.demo.demo_event, with `ts` overridden; normalized as ingest does,
envelopes of --batch events over 6 partitions, one topic per shape):
- live: every event's ts within the last two minutes, so a batch pre-aggregates into a few
  hundred rollup rows (minute buckets x the dimensions' values);
- spread: ts uniform over the past 24 h (a day of backfill), so a batch becomes tens of
  thousands of rows and the upserts, not the events, are the work.

For each shape one `tally consume` process (default rollups and settings) applies the whole
topic into a fresh database; its rate is taken from its first commit to its last (the group
join and the first batch are left out): events/s, and rollup rows upserted/s. The rows are
the consumer's own `tally_consumer_rows_upserted_total` (scraped from its metrics port at the
start and the end of the window, together with `tally_consumer_events_applied_total`), not
rows computed from the read-only polls below: the consumer polls on its own schedule, a
different split of the events into batches gives a different number of rows (a cell repeated
in two batches is upserted twice), and only its counter says what it did.

Limits, in the same run:
(a) read only: getmany + decode of every record by this process, no aggregation, no database
    (the best of --read-repeats reads of the topic). Its polls are kept, joined into batches of
    the consumer's mean batch in its window (the pipelined consumer adds polls to a batch while
    the one before commits, so its batch size follows its speed and is known only after it ran)
    and prepared (consumers.batch.prepare) for (b) and (c);
(b) COPY: the cells those batches upsert (bucket, dimensions, measures per rollup) written with
    asyncpg `copy_records_to_table` into UNLOGGED tables of the same columns, without indexes
    or constraints, one transaction per batch: the fastest way Postgres takes those rows (the
    records are built beforehand; their binary encoding is timed);
(c) Postgres direct: the same transactions the consumer would run (offset updates, claims with
    dedup, upserts), pre-aggregated, no Kafka, through consumers.flush.Flusher.
(b) and (c) run right after the consumer, --limit-runs times each (the mean is the limit), each
in a fresh database, so that the shared machine's drift moves a figure and its limits
together. With dedup on, (c) runs with dedup too, unless --no-dedup-limits (the quick suite).

Then, optionally: the consumer with TALLY_DEDUP on (--dedup-shapes), and N consumer processes
in one group on the live shape (--processes; against the 1-process live figure), and (--sketches)
the live shape with the default rollups less their sketch measures (uniq:, quantiles:), right
after the one with them: what the sketches cost (target >= 0.7, issue 19).

Ratios (bench.suite gates them): live consumer events/s / read-only events/s (target >= 0.5,
goal >= 200k ev/s); spread consumer rows/s / COPY rows/s (target >= 0.5); dedup on / off on
the same shape (target >= 0.6); 2 processes / 1 (target >= 1.6).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaProducer, TopicPartition

from bench.procs import cpu_seconds

# The consumer's own steps, called here and nowhere else in this module: when their signatures
# change (consumers/* is being reworked), only this block and the three helpers below move.
from consumers.aggregate import RollupPlan, compile_rollups
from consumers.batch import PreparedBatch, prepare
from consumers.decode import decode
from consumers.dedup_store import Dedup
from consumers.flush import Flusher
from consumers.registry import registry_version
from core import devstack, kafka
from core.db import write_engine
from core.demo import DAY_MS, demo_event
from core.migrate import migrate_database
from core.settings import Settings
from schemas import envelope, sketches
from schemas.events import InvalidEvent, normalize_event
from schemas.rollups import RollupSpec


def decoded_events(record: Any) -> int:
    """Events in one record, decoded as the consumer decodes it (the read-only limit's work)."""
    return len(decode(record)[0])


def prepare_poll(polled: Mapping[Any, Sequence[Any]], expected: Mapping[Any, int],
                 plans: Sequence[RollupPlan]) -> PreparedBatch:
    """One poll as the consumer prepares it (with the event ids, for a flush with dedup)."""
    return prepare(polled, expected, plans, dedup=True)


def make_flusher(engine: Any, group: str, plans: Sequence[RollupPlan], version: int, dedup: Dedup | None) -> Flusher:
    return Flusher(engine, group, plans, version=version, dedup=dedup)


PARTITIONS = 6
SHAPES = ("live", "spread")
LIVE_WINDOW_MS = 120_000
POOL = 20_000  # distinct demo events the topic's events are drawn from
# N consumer processes: one `tally consume --processes N` (consumers.supervise), or, False, N
# separate `tally consume` commands in one group (the same effect, without the supervisor).
CONSUME_HAS_PROCESSES = True


# -- the topic ------------------------------------------------------------------------------------


def event_ts(rng: random.Random, shape: str, now_ms: int) -> int:
    if shape == "live":
        return now_ms - rng.randrange(LIVE_WINDOW_MS)
    if shape == "spread":
        return now_ms - rng.randrange(DAY_MS)
    raise ValueError(f"unknown shape {shape!r}")


def make_envelopes(events: int, batch: int, shape: str) -> list[bytes]:
    """`events` distinct normalized events of `shape` (each its own event_id), `batch` per envelope.

    The demo's events are drawn from a pool of POOL of them (demo_event is most of the cost of a
    fresh one); each gets its own ts, and normalize_event gives it its own event_id.
    """
    rng = random.Random(1)
    now = int(time.time() * 1000)
    limits = Settings(env="test").event_limits
    pool = [demo_event(rng, now) for _ in range(min(events, POOL))]
    values: list[bytes] = []
    chunk: list[bytes] = []
    while len(values) * batch < events:
        raw = {**rng.choice(pool), "ts": event_ts(rng, shape, now)}
        try:
            chunk.append(normalize_event(raw, now, limits))
        except InvalidEvent:
            continue  # the demo's odd broken event; ingest would refuse it too
        if len(chunk) == batch:
            values.append(next(envelope.pack(chunk, 1 << 30)))
            chunk = []
    return values


async def produce(settings: Settings, values: list[bytes]) -> dict[int, int]:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5, max_request_size=kafka.MAX_RECORD_BYTES
    )
    await producer.start()
    ends: dict[int, int] = {}
    try:
        for start in range(0, len(values), 256):
            futures = [
                await producer.send(settings.topic, v, partition=(start + i) % PARTITIONS)
                for i, v in enumerate(values[start : start + 256])
            ]
            for meta in await asyncio.gather(*futures):
                ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    finally:
        await producer.stop()
    return ends


# -- limit (a): read only -------------------------------------------------------------------------


async def read_only(settings: Settings, ends: dict[int, int]) -> tuple[float, list[dict[Any, list[Any]]]]:
    """(a): events/s of getmany + decode over the whole topic, as the consumer polls it; and the polls."""
    consumer = kafka.consumer(settings, group_id=None)
    await consumer.start()
    polls: list[dict[Any, list[Any]]] = []
    try:
        tps = [TopicPartition(settings.topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        await consumer.getmany(timeout_ms=0)  # connect and fetch metadata before timing
        total = sum(ends.values())
        records = events = 0
        started = time.perf_counter()
        while records < total:
            polled = await consumer.getmany(timeout_ms=1000, max_records=settings.batch_max_records)
            for batch in polled.values():
                records += len(batch)
                for record in batch:
                    events += decoded_events(record)
            polls.append({(tp.topic, tp.partition): batch for tp, batch in polled.items()})
        elapsed = time.perf_counter() - started
    finally:
        await consumer.stop()
    return events / elapsed, polls


def prepare_batches(settings: Settings, polls: list[dict[Any, list[Any]]]) -> list[PreparedBatch]:
    plans = compile_rollups(settings.rollups)
    expected = dict.fromkeys(((settings.topic, p) for p in range(PARTITIONS)), 0)
    batches = []
    for polled in polls:
        prepared = prepare_poll(polled, expected, plans)
        for adv in prepared.advances:
            expected[(adv.topic, adv.partition)] = adv.new
        batches.append(prepared)
    return batches


def batch_rows(batch: PreparedBatch) -> int:
    return sum(len(cells) for cells in batch.aggregates.values())


# -- databases ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def wait_for_postgres(url: str) -> None:
    deadline = time.monotonic() + 30.0
    while True:
        try:
            conn = await asyncpg.connect(url)
        except (OSError, asyncpg.CannotConnectNowError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
        else:
            await conn.close()
            return


# -- limit (b): COPY ------------------------------------------------------------------------------


async def copy_limit(settings: Settings, batches: list[PreparedBatch]) -> float:
    """(b): rows/s of COPY of the batches' cells into UNLOGGED tables, no index, one transaction per batch."""
    await migrate_database(settings)  # the rollup tables: their column types are copied
    plans = compile_rollups(settings.rollups)
    conn = await asyncpg.connect(settings.postgres_url)
    try:
        tables: dict[str, tuple[str, list[str]]] = {}
        for plan in plans:
            spec = plan.spec
            columns = [*spec.key_columns, *(m.column for m in spec.measures)]
            types = dict(await conn.fetch(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped", spec.table
            ))
            name = f"copy_{spec.name}"
            await conn.execute(
                f'CREATE UNLOGGED TABLE "{name}" ({", ".join(f"{c} {types[c]}" for c in columns)})'
            )
            tables[plan.name] = (name, columns)
        # The rows as records, built before timing: the limit is what Postgres takes, not our Python.
        # Sketch measures as the bytes the consumer stores (schemas.sketches).
        sketched = {p.name: [m.is_sketch for m in p.spec.measures] for p in plans}

        def stored(rollup: str, values: Sequence[Any]) -> tuple[Any, ...]:
            return tuple(sketches.encode(v) if s and v is not None else v
                         for s, v in zip(sketched[rollup], values, strict=True))

        records = [
            [(tables[rollup], [(*key, *stored(rollup, values)) for key, values in cells.items()])
             for rollup, cells in batch.aggregates.items() if cells]
            for batch in batches
        ]
        rows = sum(batch_rows(b) for b in batches)
        started = time.perf_counter()
        for txn in records:
            async with conn.transaction():
                for (table, columns), recs in txn:
                    await conn.copy_records_to_table(table, records=recs, columns=columns)
        return rows / (time.perf_counter() - started)
    finally:
        await conn.close()


# -- limit (c): Postgres direct, the consumer's transactions --------------------------------------


async def direct(settings: Settings, batches: list[PreparedBatch], *, dedup: bool) -> float:
    """(c): events/s of Postgres applying the same transactions, aggregates computed beforehand."""
    await migrate_database(settings)
    engine = write_engine(str(settings.postgres_url))
    claims = Dedup(engine, settings.dedup_window_hours) if dedup else None
    try:
        plans = compile_rollups(settings.rollups)
        version = await registry_version(engine, settings.rollups)
        flusher = make_flusher(engine, settings.consumer_group, plans, version, claims)
        conn = await asyncpg.connect(settings.postgres_url)
        try:
            await conn.executemany(
                "INSERT INTO tally_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, $3, 0)",
                [(settings.consumer_group, settings.topic, p) for p in range(PARTITIONS)],
            )
        finally:
            await conn.close()
        if claims is not None:
            await claims.maintain()  # partitions exist before timing, as in a running consumer
        events = sum(b.events for b in batches)
        started = time.perf_counter()
        for batch in batches:
            assert await flusher.flush(batch), "fenced"
        return events / (time.perf_counter() - started)
    finally:
        if claims is not None:
            await claims.close()
        await engine.dispose()


# -- the consumer ---------------------------------------------------------------------------------


@dataclass
class Applied:
    processes: int
    events_per_s: float
    rows_per_s: float
    window_events: int
    window_rows: int
    window_batches: int
    window_s: float
    total_s: float
    window_from: str  # where the window opened
    cpu_cores: float = float("nan")  # the consumer processes' CPU in the window, in cores (1.0: one core busy)


@dataclass
class Counters:
    events: int = 0
    rows: int = 0
    batches: int = 0

    def __add__(self, other: Counters) -> Counters:
        return Counters(self.events + other.events, self.rows + other.rows, self.batches + other.batches)


def parse_counters(text: str) -> Counters:
    """The consumer's applied events, upserted rows (all rollups) and flushed batches from /metrics."""
    out = Counters()
    for line in text.splitlines():
        if line.startswith("tally_consumer_events_applied_total "):
            out.events += int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("tally_consumer_rows_upserted_total{"):
            out.rows += int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("tally_consumer_batch_seconds_count"):
            out.batches += int(float(line.rsplit(" ", 1)[1]))
    return out


async def scrape(http: httpx.AsyncClient, ports: Sequence[int]) -> list[Counters | None]:
    """Each process's counters; None for one whose metrics port does not answer yet."""
    out: list[Counters | None] = []
    for port in ports:
        try:
            response = await http.get(f"http://127.0.0.1:{port}/metrics")
            out.append(parse_counters(response.text) if response.status_code == 200 else None)
        except httpx.TransportError:
            out.append(None)
    return out


def free_ports(count: int) -> list[int]:
    """`count` consecutive ports free to listen on (`tally consume --processes N` serves child i on the first + i).

    Below the kernel's ephemeral range: a port from there (devstack.free_port) can be taken, before
    a consumer binds it, as the local end of another process's connection to the broker or Postgres.
    """
    low = 20_000
    with contextlib.suppress(OSError, ValueError):
        low = min(low, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]) - 2_000)
    rng = random.Random()
    while True:
        base = rng.randrange(low - 8_000, low - count)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return list(range(base, base + count))


async def start_consumers(settings: Settings, processes: int, log: Path) -> tuple[list[Any], list[int]]:
    """`processes` consumers of settings.consumer_group, their output in `log`; (the processes, metrics ports).

    With CONSUME_HAS_PROCESSES: one `tally consume --processes N`, whose child i serves its metrics
    on TALLY_CONSUMER_METRICS_PORT + i (consumers.supervise); otherwise N separate `tally consume`
    commands, each with its own metrics port.
    """
    ports = free_ports(processes)
    if CONSUME_HAS_PROCESSES and processes > 1:
        commands = [(["--processes", str(processes)], settings.model_copy(update={"consumer_metrics_port": ports[0]}))]
    else:
        commands = [([], settings.model_copy(update={"consumer_metrics_port": port})) for port in ports]
    procs = []
    with log.open("ab") as out:
        for extra, s in commands:
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "core.cli", "consume", *extra, env=s.process_env(), stdout=out,
                stderr=subprocess.STDOUT, preexec_fn=devstack._die_with_parent,
            ))
    return procs, ports


async def consumer_run(settings: Settings, ends: dict[int, int], events_per_record: int, processes: int,
                       tmp: Path) -> Applied:
    """`processes` consumers over the whole topic; rates from the moment every one has committed to the last commit.

    The window opens at a scrape of every process's counters once each has applied a batch (so
    the group join, a rebalance when the second one joins and the first batches are left out),
    and closes when the stored offsets reach the end of the topic.
    """
    await migrate_database(settings)
    log = tmp / f"consume-{settings.consumer_group}.log"
    procs, ports = await start_consumers(settings, processes, log)
    conn = await asyncpg.connect(settings.postgres_url)
    total_records = sum(ends.values())
    total_events = total_records * events_per_record
    started = time.perf_counter()
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            first: tuple[float, Counters] | None = None  # the first scrape after any commit
            opened: tuple[float, Counters] | None = None  # the first scrape after every process committed
            cpu_opened: float | None = None
            cpu_closed = 0.0
            while True:
                done = int(await conn.fetchval(
                    "SELECT coalesce(sum(next_offset), 0) FROM tally_offsets WHERE group_id = $1",
                    settings.consumer_group,
                ))
                end = time.perf_counter()
                if done >= total_records:
                    cpu_closed = sum(cpu_seconds(p.pid, children=True) for p in procs)
                    break
                if done and opened is None:
                    counters = await scrape(http, ports)
                    seen = (time.perf_counter(), sum((c for c in counters if c is not None), Counters()))
                    if first is None and seen[1].events:
                        first = seen
                    if all(c is not None and c.events for c in counters):
                        opened = seen
                        cpu_opened = sum(cpu_seconds(p.pid, children=True) for p in procs)
                for proc in procs:
                    if proc.returncode is not None:
                        raise RuntimeError(f"a consumer exited with {proc.returncode}; see {log}")
                await asyncio.sleep(0.02 if opened is not None else 0.05)
            # The last batch's counters are bumped right after its commit: wait for them.
            deadline = time.monotonic() + 5.0
            while True:
                counters = await scrape(http, ports)
                final = sum((c for c in counters if c is not None), Counters())
                if final.events >= total_events or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.02)
        if final.events and not final.rows:
            raise RuntimeError("the consumer applied events but exported no tally_consumer_rows_upserted_total")
        window_from = "every process's first commit" if processes > 1 else "its first commit"
        if opened is None:  # one process committed nothing before the end: from the first commit seen
            opened = first
            window_from = f"the first commit (not every one of {processes} processes committed before the end)"
        if opened is None:
            raise RuntimeError(f"nothing left to measure after the first batch: more events ({total_events:,})")
        t0, c0 = opened
        events, rows, seconds = total_events - c0.events, final.rows - c0.rows, end - t0
        if events <= 0 or seconds <= 0:
            raise RuntimeError(f"nothing left to measure after the first batch: more events ({total_events:,})")
        cores = (cpu_closed - cpu_opened) / seconds if cpu_opened is not None else float("nan")
        return Applied(processes, events / seconds, rows / seconds, events, rows, final.batches - c0.batches,
                       seconds, end - started, window_from, cores)
    finally:
        await conn.close()
        for proc in procs:
            if proc.returncode is None:  # terminate() on an exited process raises and hides why it exited
                proc.terminate()
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 30)


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Topic:
    shape: str
    settings: Settings
    ends: dict[int, int]
    events: int
    envelope_bytes: int


async def make_topic(base: Settings, shape: str, events: int, batch: int) -> Topic:
    settings = base.model_copy(update={"topic": f"bench.{shape}", "dlq_topic": f"bench.{shape}.dlq"})
    await kafka.ensure_topics(settings)
    values = make_envelopes(events, batch, shape)
    ends = await produce(settings, values)
    return Topic(shape, settings, ends, len(values) * batch, round(sum(map(len, values)) / len(values)))


async def limits(admin_url: str, topic: Topic, batches: list[PreparedBatch], tag: str, *, dedup: bool,
                 copy: bool) -> tuple[float, float | None]:
    """One run of (c) Postgres direct (events/s) and, if `copy`, (b) COPY (rows/s), each in a fresh database."""
    async with fresh_database(admin_url) as url:
        s = topic.settings.model_copy(update={"postgres_url": url, "consumer_group": f"direct-{topic.shape}-{tag}"})
        direct_rate = await direct(s, batches, dedup=dedup)
    copy_rate = None
    if copy:
        async with fresh_database(admin_url) as url:
            copy_rate = await copy_limit(topic.settings.model_copy(update={"postgres_url": url}), batches)
    return direct_rate, copy_rate


def regroup(polls: list[dict[Any, list[Any]]], records: int) -> list[dict[Any, list[Any]]]:
    """Consecutive polls joined into batches as near `records` records as whole polls allow."""
    out: list[dict[Any, list[Any]]] = []
    current: dict[Any, list[Any]] = {}
    count = 0
    for polled in polls:
        size = sum(len(batch) for batch in polled.values())
        if count and abs(count + size - records) > abs(count - records):
            out.append(current)
            current, count = {}, 0
        for tp, batch in polled.items():
            current.setdefault(tp, []).extend(batch)
        count += size
    if current:
        out.append(current)
    return out


async def shape_run(args: argparse.Namespace, admin_url: str, topic: Topic, tmp: Path) -> dict[str, Any]:
    # The read limit is the best of a few reads (each is short: a fraction of a second over the topic).
    read_rate, polls = 0.0, []
    for _ in range(max(1, args.read_repeats)):
        rate, polled = await read_only(topic.settings, topic.ends)
        if rate > read_rate:
            read_rate, polls = rate, polled
    out: dict[str, Any] = {
        "events": topic.events, "envelope_bytes": topic.envelope_bytes, "read_polls": len(polls),
        "read_only_events_per_s": round(read_rate),
    }
    for dedup in (False, True):
        if dedup and topic.shape not in args.dedup_shapes:
            continue
        tag = "dedup_on" if dedup else "dedup_off"
        async with fresh_database(admin_url) as url:
            s = topic.settings.model_copy(
                update={"postgres_url": url, "consumer_group": f"bench-{topic.shape}-{tag}", "dedup": dedup}
            )
            applied = await consumer_run(s, topic.ends, args.batch, 1, tmp)
        batches = max(1, applied.window_batches)
        r: dict[str, Any] = {
            "consumer_events_per_s": round(applied.events_per_s),
            "consumer_rows_per_s": round(applied.rows_per_s),
            "measured_events": applied.window_events,
            "measured_rows": applied.window_rows,
            "measured_batches": applied.window_batches,
            "measured_seconds": round(applied.window_s, 2),
            "consumer_seconds_total": round(applied.total_s, 1),
            "consumer_events_per_batch": round(applied.window_events / batches),
            "consumer_rows_per_batch": round(applied.window_rows / batches),
            "ratio_to_read_only": round(applied.events_per_s / read_rate, 3),
            "consumer_cpu_cores": round(applied.cpu_cores, 2),
            "consumer_cpu_us_per_event": round(1e6 * applied.cpu_cores / applied.events_per_s, 2),
        }
        out[tag] = r
        if dedup and not args.dedup_limits:  # Postgres direct with dedup is optional (quick: not)
            continue
        # The limits' transactions are the consumer's size: the read's polls joined to its mean batch
        # (the pipelined consumer adds polls to a batch while the one before commits, so its batches
        # follow its speed and are known only now). Right after it, so that the shared machine's
        # drift moves the figure and its limits together.
        per_batch = min(topic.settings.batch_max_records, max(1, round(applied.window_events / batches / args.batch)))
        prepared = prepare_batches(topic.settings, regroup(polls, per_batch))
        rows = sum(batch_rows(b) for b in prepared)
        events = sum(b.events for b in prepared)
        directs: list[float] = []
        copies: list[float] = []
        for _ in range(max(1, args.limit_runs)):
            d, c = await limits(admin_url, topic, prepared, tag, dedup=dedup, copy=not dedup)
            directs.append(d)
            copies += [c] if c is not None else []
        direct_rate = sum(directs) / len(directs)
        r.update({
            "limit_batches": len(prepared),
            "limit_records_per_batch": per_batch,
            "limit_rows_per_batch": round(rows / len(prepared)),
            "limit_events_per_row": round(events / rows, 1) if rows else None,
            "postgres_direct_events_per_s": round(direct_rate),
            "postgres_direct_rows_per_s": round(direct_rate * rows / events) if events else None,
            "postgres_direct_runs": [round(x) for x in directs],
            "ratio_to_postgres_direct": round(applied.events_per_s / direct_rate, 3),
        })
        if copies:
            copy_rate = sum(copies) / len(copies)
            out["copy_rows_per_s"] = round(copy_rate)
            out["copy_runs"] = [round(x) for x in copies]
            r["rows_ratio_to_copy"] = round(r["consumer_rows_per_s"] / copy_rate, 3)
    if "dedup_on" in out:
        out["dedup_on_vs_off"] = round(
            out["dedup_on"]["consumer_events_per_s"] / out["dedup_off"]["consumer_events_per_s"], 3
        )
    return out


async def run(args: argparse.Namespace, kafka_url: str, admin_url: str, tmp: Path) -> dict[str, Any]:
    await wait_for_postgres(admin_url)
    base = Settings(env="test", kafka_bootstrap=kafka_url, postgres_url=admin_url, topic="bench.events",
                    dlq_topic="bench.events.dlq", drain_seconds=0, topic_partitions=PARTITIONS, auth=False,
                    consumer_metrics_port=devstack.free_port())
    started = time.perf_counter()
    row: dict[str, Any] = {"benchmark": "consumer", "events_per_record": args.batch, "partitions": PARTITIONS,
                           "batch_max_records": base.batch_max_records, "cores": os.cpu_count(),
                           "postgres_fsync": not args.no_fsync, "read_repeats": args.read_repeats,
                           "limit_runs": args.limit_runs, "shapes": {}, "seconds": {}}
    sizes = {"live": args.live_events, "spread": args.spread_events}
    topics = {}
    for shape in args.shapes:
        topics[shape] = await make_topic(base, shape, sizes[shape], args.batch)
    row["seconds"]["produce"] = round(time.perf_counter() - started, 1)
    for shape, topic in topics.items():
        t = time.perf_counter()
        row["shapes"][shape] = await shape_run(args, admin_url, topic, tmp)
        row["seconds"][shape] = round(time.perf_counter() - t, 1)
        if shape == "live" and args.sketches:
            t = time.perf_counter()
            row["sketches"] = await sketch_cost(topic, admin_url, tmp, args.batch, row["shapes"]["live"])
            row["seconds"]["sketches"] = round(time.perf_counter() - t, 1)
    if args.processes and "live" in topics:
        topic = topics["live"]
        one = row["shapes"]["live"]["dedup_off"]
        row["processes"] = {}
        for n in args.processes:
            t = time.perf_counter()
            async with fresh_database(admin_url) as url:
                s = topic.settings.model_copy(update={"postgres_url": url, "consumer_group": f"bench-live-{n}proc"})
                applied = await consumer_run(s, topic.ends, args.batch, n, tmp)
            row["processes"][str(n)] = {
                "shape": "live", "consumer_events_per_s": round(applied.events_per_s),
                "consumer_rows_per_s": round(applied.rows_per_s), "measured_events": applied.window_events,
                "measured_seconds": round(applied.window_s, 2), "window_from": applied.window_from,
                "consumer_seconds_total": round(applied.total_s, 1),
                "one_process_events_per_s": one["consumer_events_per_s"],
                "ratio_to_one_process": round(applied.events_per_s / one["consumer_events_per_s"], 3),
            }
            row["seconds"][f"{n}proc"] = round(time.perf_counter() - t, 1)
    row["seconds"]["total"] = round(time.perf_counter() - started, 1)
    return row


def without_sketches(specs: Sequence[RollupSpec], path: Path) -> Path:
    """A rollups file of `specs` less their sketch measures (a rollup of sketches alone is left out)."""
    def toml(value: Any) -> str:
        return json.dumps(value)  # a JSON string or list of strings is TOML as well

    blocks = []
    for spec in specs:
        measures = [m.declaration for m in spec.measures if not m.is_sketch]
        if not measures:
            continue
        lines = ["[[rollup]]", f"name = {toml(spec.name)}", f"granularities = {toml(list(spec.granularities))}",
                 f"dimensions = {toml([d.path for d in spec.dimensions])}", f"measures = {toml(measures)}"]
        if spec.where:
            lines.append("where = { " + ", ".join(f"{toml(k)} = {toml(list(v))}" for k, v in spec.where.items()) + " }")
        blocks.append("\n".join(lines))
    path.write_text("\n\n".join(blocks) + "\n")
    return path


async def sketch_cost(topic: Topic, admin_url: str, tmp: Path, per_record: int, live: dict[str, Any]) -> dict[str, Any]:
    """The live topic applied by a consumer whose rollups lack the sketch measures, beside the one
    with them (`live`, measured just before)."""
    with_sketches = live["dedup_off"]
    plain = without_sketches(topic.settings.rollups, tmp / "rollups-without-sketches.toml")
    async with fresh_database(admin_url) as url:
        s = Settings(**{**topic.settings.model_dump(), "rollups_file": plain, "postgres_url": url,
                        "consumer_group": "bench-live-no-sketches"})
        applied = await consumer_run(s, topic.ends, per_record, 1, tmp)
    return {
        "sketch_measures": [m.declaration for spec in topic.settings.rollups for m in spec.measures if m.is_sketch],
        "with_events_per_s": with_sketches["consumer_events_per_s"],
        "with_cpu_us_per_event": with_sketches["consumer_cpu_us_per_event"],
        "without_events_per_s": round(applied.events_per_s),
        "without_cpu_us_per_event": round(1e6 * applied.cpu_cores / applied.events_per_s, 2),
        "without_measured_events": applied.window_events,
        "without_measured_seconds": round(applied.window_s, 2),
        "ratio": round(with_sketches["consumer_events_per_s"] / applied.events_per_s, 3),
    }


def measure(*, live_events: int = 600_000, spread_events: int = 300_000, batch: int = 100, fsync: bool = True,
            shapes: Sequence[str] = SHAPES, dedup_shapes: Sequence[str] = ("live", "spread"),
            processes: Sequence[int] = (2,), read_repeats: int = 3, limit_runs: int = 2,
            dedup_limits: bool = True, sketches: bool = True, tmp: Path | None = None) -> dict[str, Any]:
    """Start a broker and Postgres, run the benchmark, stop them; the figures."""
    args = argparse.Namespace(live_events=live_events, spread_events=spread_events, batch=batch, no_fsync=not fsync,
                              shapes=tuple(shapes), dedup_shapes=tuple(dedup_shapes), processes=tuple(processes),
                              read_repeats=read_repeats, limit_runs=limit_runs, dedup_limits=dedup_limits,
                              sketches=sketches)
    tmp = tmp or Path(tempfile.mkdtemp(prefix="tally-bench-"))
    broker = devstack.kafka(devstack.free_port()).start()
    postgres = devstack.postgres(tmp / "pg" / "data", devstack.free_port(), durable=fsync).start()
    try:
        return asyncio.run(run(args, broker.url, postgres.url, tmp))
    finally:
        broker.stop()
        postgres.stop()


# -- the report -----------------------------------------------------------------------------------


def conditions(row: dict[str, Any], shape: str) -> str:
    """What every figure of a shape was measured under."""
    s = row["shapes"][shape]
    off = s["dedup_off"]
    return (f"{shape}: {s['events']:,} events, {row['events_per_record']}/envelope ({s['envelope_bytes']:,} B), "
            f"{row['partitions']} partitions; consumer: {off['measured_batches']} batches of "
            f"{off['consumer_events_per_batch']:,} events, {off['consumer_rows_per_batch']:,} rows in its window "
            f"({off['measured_seconds']} s); "
            f"limits: {off['limit_batches']} txns of {off['limit_records_per_batch']} records, "
            f"{off['limit_rows_per_batch']:,} rows (read: {s['read_polls']} polls); {row['cores']} cores shared; "
            f"Postgres fsync {'on' if row['postgres_fsync'] else 'off'}")


def report(row: dict[str, Any]) -> list[str]:
    lines = [f"1 `tally consume` process, default rollups; limits right after the consumer (mean of "
             f"{row['limit_runs']}), in transactions of its mean batch; read only: best of {row['read_repeats']}"]
    for shape, s in row["shapes"].items():
        lines.append(f"-- {conditions(row, shape)}")
        lines.append(f"   read only (getmany + decode)   {s['read_only_events_per_s']:>10,} events/s")
        lines.append(f"   COPY into UNLOGGED, same txns  {s['copy_rows_per_s']:>10,} rows/s   "
                     f"(runs {', '.join(f'{r:,}' for r in s['copy_runs'])})")
        for tag, label in (("dedup_off", "dedup off"), ("dedup_on", "dedup on ")):
            if tag not in s:
                continue
            r = s[tag]
            lines.append(
                f"   {label}: consumer         {r['consumer_events_per_s']:>10,} events/s "
                f"{r['consumer_rows_per_s']:>9,} rows/s  ({r['ratio_to_read_only']:.3f} of read only"
                + (f", {r['ratio_to_postgres_direct']:.3f} of Postgres direct" if "postgres_direct_runs" in r else "")
                + (f", rows {r['rows_ratio_to_copy']:.3f} of COPY" if "rows_ratio_to_copy" in r else "")
                + f"; {r['measured_events']:,} events, {r['measured_rows']:,} rows in {r['measured_batches']} "
                f"batches, {r['measured_seconds']} s; consumer CPU {r['consumer_cpu_cores']:.2f} cores, "
                f"{r['consumer_cpu_us_per_event']:.2f} µs/event)"
            )
            if "postgres_direct_events_per_s" not in r:
                continue
            lines.append(
                f"   {label}: Postgres direct  {r['postgres_direct_events_per_s']:>10,} events/s "
                f"{r['postgres_direct_rows_per_s']:>9,} rows/s  (same transactions, pre-aggregated, no Kafka; "
                f"runs {', '.join(f'{x:,}' for x in r['postgres_direct_runs'])} ev/s)"
            )
        if "dedup_on_vs_off" in s:
            lines.append(f"   dedup on / off (consumer events/s): {s['dedup_on_vs_off']:.3f}")
    for n, p in row.get("processes", {}).items():
        lines.append(f"-- {n} consumer processes, one group, live shape: {p['consumer_events_per_s']:,} events/s, "
                     f"{p['ratio_to_one_process']:.3f} of 1 process ({p['measured_events']:,} events in "
                     f"{p['measured_seconds']} s, from {p['window_from']})")
    if "sketches" in row:
        k = row["sketches"]
        lines.append(f"-- live shape, default rollups with / without {', '.join(k['sketch_measures'])}: "
                     f"{k['with_events_per_s']:,} / {k['without_events_per_s']:,} events/s = {k['ratio']:.3f} "
                     f"(target >= 0.7); consumer CPU {k['with_cpu_us_per_event']:.2f} / "
                     f"{k['without_cpu_us_per_event']:.2f} µs/event")
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in row["seconds"].items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--live-events", type=int, default=600_000)
    parser.add_argument("--spread-events", type=int, default=300_000)
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--dedup-shapes", nargs="*", choices=SHAPES, default=["live", "spread"],
                        help="shapes also measured with TALLY_DEDUP on (none: --dedup-shapes)")
    parser.add_argument("--processes", type=int, nargs="*", default=[2],
                        help="consumer process counts measured on the live shape against 1 (none: --processes)")
    parser.add_argument("--batch", type=int, default=100, help="events per envelope (ingest's chunking)")
    parser.add_argument("--no-fsync", action="store_true", help="Postgres with fsync and synchronous_commit off")
    parser.add_argument("--read-repeats", type=int, default=3, help="reads of the topic; the best is the limit")
    parser.add_argument("--limit-runs", type=int, default=2, help="runs of limits (b) and (c); the mean is the limit")
    parser.add_argument("--no-dedup-limits", action="store_true",
                        help="with dedup on, the consumer only (no Postgres direct with dedup beside it)")
    parser.add_argument("--no-sketches", action="store_true",
                        help="skip the live run with the default rollups less their sketch measures")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    row = measure(live_events=args.live_events, spread_events=args.spread_events, batch=args.batch,
                  fsync=not args.no_fsync, shapes=args.shapes, dedup_shapes=args.dedup_shapes,
                  processes=args.processes, read_repeats=args.read_repeats, limit_runs=args.limit_runs,
                  dedup_limits=not args.no_dedup_limits, sketches=not args.no_sketches)
    for line in report(row):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
