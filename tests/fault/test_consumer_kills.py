"""kill -9 consumers at random moments while events stream in: the rollups still equal the oracle exactly.

Three `tally consume` processes share a 6-partition topic. The test produces
envelopes of 100 normalized events (as ingest makes them) straight to Kafka with
acks=all and keeps exactly what the broker acknowledged. Meanwhile it SIGKILLs a
random consumer at random moments (no chance to finish a batch or to leave the
group) and starts a new one in its place. Tansu ignores LeaveGroup, so a killed
member's partitions move only once its session (6 s here) expires; the survivors
and the restarted processes then seek to the offsets stored in Postgres. One
consumer is also frozen (SIGSTOP) for longer than its session and then thawed: it
comes back as a zombie, possibly with a batch in hand for partitions that have
moved, which the conditional offset update must refuse. Once
every partition's stored offset reaches its end, the rollup tables must equal the
aggregates computed by tests/oracle.py from the acknowledged events, row by row.

With `dedup`, the stream also carries retries (acknowledged events sent again in
new envelopes, as a producer does after an ambiguous error): each must count once,
which checks that the claims commit and roll back with the offsets under kills.

The schedule and the events come from a seeded random.Random; the seed is printed
and is in every assertion message: rerun with TALLY_FAULT_SEED=<seed>. (What a
kill interrupts also depends on timing, which no seed fixes.)
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from core.migrate import migrate
from core.settings import Settings
from schemas.envelope import headers as envelope_headers
from schemas.envelope import pack
from schemas.events import normalize_event
from tests import oracle
from tests.fault.support import (
    assert_rollups_exact,
    consumer_logs,
    seeded,
    seen_ids,
    start_consumer,
    wait_caught_up,
)
from tests.integration.consumer_helpers import stored_offsets
from tests.processes import TallyProcess

pytestmark = pytest.mark.fault

PARTITIONS = 6
CONSUMERS = 3
SECONDS = 20.0  # of streaming
KILLS = 4
ENVELOPES_PER_SECOND = 20
EVENTS_PER_ENVELOPE = 100


@dataclass
class Stream:
    acked: list[dict[str, Any]] = field(default_factory=list)  # distinct events the broker acknowledged
    encoded: list[bytes] = field(default_factory=list)  # the same, as sent
    ends: dict[int, int] = field(default_factory=dict)  # per partition, the offset after the last ack
    retried: int = 0  # acknowledged events sent again


async def produce_stream(settings: Settings, rng: random.Random, seconds: float, *, retries: bool) -> Stream:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    out = Stream()
    try:
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < seconds:
            now = int(time.time() * 1000)
            again = retries and len(out.encoded) > 200 and rng.random() < 0.25
            if again:
                encoded = rng.sample(out.encoded, rng.randrange(1, 60))
            else:
                raw = oracle.make_events(rng, EVENTS_PER_ENVELOPE, now)
                encoded = [normalize_event(r, now, settings.event_limits) for r in raw]
            partition = rng.randrange(PARTITIONS)
            future = await producer.send(
                settings.topic, next(pack(encoded, 1 << 30)), partition=partition,
                headers=envelope_headers(uuid.uuid4().hex),
            )
            meta = await future  # acks=all: from here on the events must count
            out.ends[partition] = max(out.ends.get(partition, 0), meta.offset + 1)
            if again:
                out.retried += len(encoded)
            else:
                out.encoded += encoded
                out.acked += [orjson.loads(e) for e in encoded]
            sent += 1
            await asyncio.sleep(max(0.0, started + sent / ENVELOPES_PER_SECOND - time.monotonic()))
    finally:
        await producer.stop()
    return out


async def chaos(
    settings: Settings, tmp: Path, procs: list[TallyProcess], rng: random.Random, log: list[str], frozen: set[int]
) -> None:
    """KILLS times: at a random moment, SIGKILL a random consumer (not the frozen one); start a new one after
    a random pause."""
    began = time.monotonic()
    moments = sorted(rng.uniform(2.0, SECONDS - 3.0) for _ in range(KILLS))
    plan = [(at, rng.randrange(CONSUMERS), rng.uniform(0.2, 2.5)) for at in moments]
    for at, slot, pause in plan:
        await asyncio.sleep(max(0.0, began + at - time.monotonic()))
        while slot in frozen:
            slot = (slot + 1) % CONSUMERS
        await asyncio.to_thread(procs[slot].kill)
        log.append(f"{time.monotonic() - began:5.1f}s kill -9 consumer {slot}; restart in {pause:.1f}s")
        await asyncio.sleep(pause)
        procs[slot] = await start_consumer(settings, tmp)


async def freeze(
    settings: Settings, procs: list[TallyProcess], rng: random.Random, log: list[str], frozen: set[int]
) -> None:
    """Once: SIGSTOP a running consumer for longer than its session, then SIGCONT it (a zombie comes back)."""
    began = time.monotonic()
    await asyncio.sleep(rng.uniform(3.0, SECONDS - 10.0))
    alive = [i for i, p in enumerate(procs) if p.process is not None and p.process.poll() is None]
    slot = rng.choice(alive)
    proc, frozen_for = procs[slot], settings.session_timeout_ms / 1000 + 1.5
    assert proc.process is not None
    frozen.add(slot)
    proc.process.send_signal(signal.SIGSTOP)
    log.append(f"{time.monotonic() - began:5.1f}s SIGSTOP consumer {slot} for {frozen_for:.1f}s")
    await asyncio.sleep(frozen_for)
    proc.process.send_signal(signal.SIGCONT)
    frozen.discard(slot)


@pytest.mark.parametrize("dedup", [False, True], ids=["offsets", "offsets+dedup"])
async def test_kill_9_consumers_mid_stream_and_the_rollups_stay_exact(
    settings: Settings, tmp_path: Path, dedup: bool
) -> None:
    seed, why = seeded()
    print(f"fault test {'with' if dedup else 'without'} dedup: {why}")
    config = settings.model_copy(update={"topic_partitions": PARTITIONS, "dedup": dedup})
    await migrate(config)
    began = time.monotonic()
    procs = list(await asyncio.gather(*(start_consumer(config, tmp_path) for _ in range(CONSUMERS))))
    log: list[str] = []
    frozen: set[int] = set()
    try:
        streaming = asyncio.create_task(produce_stream(config, random.Random(seed), SECONDS, retries=dedup))
        await asyncio.gather(
            chaos(config, tmp_path, procs, random.Random(seed + 1), log, frozen),
            freeze(config, procs, random.Random(seed + 2), log, frozen),
        )
        stream = await streaming
        await wait_caught_up(config, stream.ends, procs, why)
        print("\n".join(log))
        print(f"{len(stream.acked)} events acknowledged ({stream.retried} more sent again) on "
              f"{sum(stream.ends.values())} records; caught up {time.monotonic() - began:.1f}s after the start")
        logs = consumer_logs(tmp_path)
        print(f"{len(logs)} consumer processes; {sum(t.count('batch fenced') for t in logs)} batches fenced")

        assert sum("kill -9" in line for line in log) == KILLS, why
        assert await stored_offsets(config) == stream.ends, why
        await assert_rollups_exact(config, stream.acked, why)
        if dedup:
            assert stream.retried > 0, why
            assert await seen_ids(config) == len(stream.acked), why
    finally:
        codes = [proc.stop() for proc in procs]
    assert codes == [0] * CONSUMERS, why
