"""Consumer events/s applied to Postgres, beside what bounds it, measured in the same run:
(a) the same topic merely read (getmany + decode, no aggregation, no database) by one
process (the best of --read-repeats reads), and (b) Postgres taking the resulting transactions
directly (the same offset updates, claims and upserts, pre-aggregated, no Kafka; the mean of
one run before the consumer and one after). Then the same with TALLY_DEDUP on.

    .venv/bin/python -m bench.consumer_throughput [--events 600000] [--batch 100] [--no-fsync] [--json out.json]

(`measure()` returns the figures, for bench.suite.)

N events are produced first (demo traffic, normalized as ingest does, envelopes of --batch
events over 6 partitions); one `tally consume` process (default rollups and settings) then
applies them, once without and once with de-duplication, each into a fresh database.
The consumer's rate is taken from its first commit to its last (the group join and the
first batch are left out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer, TopicPartition

from consumers.aggregate import compile_rollups
from consumers.batch import PreparedBatch, prepare
from consumers.decode import decode
from consumers.dedup_store import Dedup
from consumers.flush import Flusher
from consumers.registry import registry_version
from core import devstack, kafka
from core.db import write_engine
from core.demo import demo_event
from core.migrate import migrate, migrate_database
from core.settings import Settings
from schemas import envelope
from schemas.events import InvalidEvent, normalize_event

PARTITIONS = 6


def make_envelopes(events: int, batch: int) -> list[bytes]:
    """`events` distinct normalized events (each its own event_id), `batch` per envelope."""
    rng = random.Random(1)
    now = int(time.time() * 1000)
    limits = Settings(env="test").event_limits
    values: list[bytes] = []
    chunk: list[bytes] = []
    while len(values) * batch < events:
        try:
            chunk.append(normalize_event(demo_event(rng, now), now, limits))
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
                    events += len(decode(record)[0])
            polls.append({(tp.topic, tp.partition): batch for tp, batch in polled.items()})
        elapsed = time.perf_counter() - started
    finally:
        await consumer.stop()
    return events / elapsed, polls


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


async def direct(settings: Settings, batches: list[PreparedBatch], *, dedup: bool) -> float:
    """(b): events/s of Postgres applying the same transactions, aggregates computed beforehand."""
    await migrate_database(settings)
    engine = write_engine(str(settings.postgres_url))
    claims = Dedup(engine, settings.dedup_window_hours) if dedup else None
    try:
        plans = compile_rollups(settings.rollups)
        version = await registry_version(engine, settings.rollups)
        flusher = Flusher(engine, settings.consumer_group, plans, version=version, dedup=claims)
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


@dataclass
class Applied:
    events_per_s: float
    window_events: int
    window_s: float
    total_s: float


async def consumer_process(settings: Settings, ends: dict[int, int], batch: int, tmp: Path) -> Applied:
    """One `tally consume` process over the whole topic; events/s from its first commit to its last."""
    await migrate_database(settings)
    env = settings.process_env()
    with (tmp / f"consume-{settings.consumer_group}.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "core.cli", "consume", env=env, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=devstack._die_with_parent,
        )
    conn = await asyncpg.connect(settings.postgres_url)
    total = sum(ends.values())
    started = time.perf_counter()
    try:
        first: tuple[float, int] | None = None
        while True:
            done = int(await conn.fetchval(
                "SELECT coalesce(sum(next_offset), 0) FROM tally_offsets WHERE group_id = $1", settings.consumer_group
            ))
            now = time.perf_counter()
            if done and first is None:
                first = (now, done)
            if done >= total:
                break
            if proc.returncode is not None:
                raise RuntimeError(f"the consumer exited with {proc.returncode}; see {log.name}")
            await asyncio.sleep(0.02)
        assert first is not None
        window = (total - first[1]) * batch
        return Applied(window / (now - first[0]) if now > first[0] else float("nan"), window, now - first[0],
                       now - started)
    finally:
        await conn.close()
        if proc.returncode is None:  # terminate() on an exited process raises and hides why it exited
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


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


async def run(args: argparse.Namespace, kafka_url: str, admin_url: str, tmp: Path) -> dict[str, Any]:
    await wait_for_postgres(admin_url)
    base = Settings(env="test", kafka_bootstrap=kafka_url, postgres_url=admin_url, topic="bench.events",
                    dlq_topic="bench.events.dlq", drain_seconds=0, topic_partitions=PARTITIONS, auth=False,
                    consumer_metrics_port=devstack.free_port())
    async with fresh_database(admin_url) as url:
        await migrate(base.model_copy(update={"postgres_url": url}))  # topics with their partition count
    values = make_envelopes(args.events, args.batch)
    ends = await produce(base, values)
    events = len(values) * args.batch

    # The limit is the best of a few reads (each is short: a fraction of a second over the topic).
    read_rate, polls = 0.0, []
    for _ in range(max(1, args.read_repeats)):
        rate, polled = await read_only(base, ends)
        if rate > read_rate:
            read_rate, polls = rate, polled
    plans = compile_rollups(base.rollups)
    expected = dict.fromkeys(((base.topic, p) for p in range(PARTITIONS)), 0)
    batches = []
    for polled in polls:
        prepared = prepare(polled, expected, plans, dedup=True)
        for adv in prepared.advances:
            expected[(adv.topic, adv.partition)] = adv.new
        batches.append(prepared)
    row: dict[str, Any] = {"benchmark": "consumer", "events": events, "events_per_record": args.batch,
                           "partitions": PARTITIONS, "batch_max_records": base.batch_max_records,
                           "polls": len(batches), "read_only_events_per_s": round(read_rate), "cores": os.cpu_count(),
                           "postgres_fsync": not args.no_fsync, "read_repeats": args.read_repeats}
    for dedup in args.dedup:
        tag = "dedup_on" if dedup else "dedup_off"
        # Postgres direct before and after the consumer (the mean is the limit), so that the
        # machine's drift during the run (it is shared) moves the figure and its limit together.
        direct_rates = []
        for when in ("before", "after"):
            if when == "after":
                async with fresh_database(admin_url) as url:
                    settings = base.model_copy(
                        update={"postgres_url": url, "consumer_group": f"bench-{tag}", "dedup": dedup}
                    )
                    applied = await consumer_process(settings, ends, args.batch, tmp)
            async with fresh_database(admin_url) as url:
                settings = base.model_copy(update={"postgres_url": url, "consumer_group": f"direct-{tag}"})
                direct_rates.append(await direct(settings, batches, dedup=dedup))
        direct_rate = sum(direct_rates) / len(direct_rates)
        row[tag] = {
            "consumer_events_per_s": round(applied.events_per_s),
            "measured_events": applied.window_events,
            "measured_seconds": round(applied.window_s, 2),
            "postgres_direct_events_per_s": round(direct_rate),
            "postgres_direct_runs": [round(r) for r in direct_rates],
            "ratio_to_read_only": round(applied.events_per_s / read_rate, 3),
            "ratio_to_postgres_direct": round(applied.events_per_s / direct_rate, 3),
        }
    if "dedup_on" in row and "dedup_off" in row:
        row["dedup_cost_consumer"] = round(1 - row["dedup_on"]["consumer_events_per_s"]
                                           / row["dedup_off"]["consumer_events_per_s"], 3)
        row["dedup_cost_postgres_direct"] = round(1 - row["dedup_on"]["postgres_direct_events_per_s"]
                                                  / row["dedup_off"]["postgres_direct_events_per_s"], 3)
    return row


def measure(*, events: int = 600_000, batch: int = 100, fsync: bool = True, dedup: tuple[bool, ...] = (False, True),
            read_repeats: int = 3, tmp: Path | None = None) -> dict[str, Any]:
    """Start a broker and Postgres, run the benchmark, stop them; the figures."""
    args = argparse.Namespace(events=events, batch=batch, no_fsync=not fsync, dedup=dedup, read_repeats=read_repeats)
    tmp = tmp or Path(tempfile.mkdtemp(prefix="tally-bench-"))
    broker = devstack.kafka(devstack.free_port()).start()
    postgres = devstack.postgres(tmp / "pg" / "data", devstack.free_port(), durable=fsync).start()
    try:
        return asyncio.run(run(args, broker.url, postgres.url, tmp))
    finally:
        broker.stop()
        postgres.stop()


def report(row: dict[str, Any]) -> list[str]:
    lines = [
        f"{row['events']:,} events in envelopes of {row['events_per_record']} over {PARTITIONS} partitions; "
        f"1 consumer process, default rollups, {row['polls']} polls of <= {row['batch_max_records']} records; "
        f"Postgres fsync {'on' if row['postgres_fsync'] else 'off'}; {row['cores']} cores shared by everything",
        f"read only (getmany + decode):  {row['read_only_events_per_s']:>10,} events/s",
    ]
    for tag, label in (("dedup_off", "dedup off"), ("dedup_on", "dedup on ")):
        if tag not in row:
            continue
        r = row[tag]
        lines.append(
            f"{label}: consumer applied  {r['consumer_events_per_s']:>10,} events/s  "
            f"(ratio {r['ratio_to_read_only']:.3f} of read only, {r['ratio_to_postgres_direct']:.3f} of Postgres "
            f"direct; {r['measured_events']:,} events in {r['measured_seconds']} s)"
        )
        lines.append(
            f"{label}: Postgres direct   {r['postgres_direct_events_per_s']:>10,} events/s  "
            "(same transactions, pre-aggregated, no Kafka)"
        )
    if "dedup_cost_consumer" in row:
        lines.append(f"dedup cost: {row['dedup_cost_consumer']:.1%} of consumer events/s, "
                     f"{row['dedup_cost_postgres_direct']:.1%} of Postgres direct events/s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=600_000)
    parser.add_argument("--batch", type=int, default=100, help="events per envelope (ingest's chunking)")
    parser.add_argument("--no-fsync", action="store_true", help="Postgres with fsync and synchronous_commit off")
    parser.add_argument("--read-repeats", type=int, default=3, help="reads of the topic; the best is the limit")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    row = measure(events=args.events, batch=args.batch, fsync=not args.no_fsync, read_repeats=args.read_repeats)
    for line in report(row):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
