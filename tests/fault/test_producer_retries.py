"""Producers that time out and retry with their Idempotency-Key: every batch counted exactly once.

Three producers post keyed batches to a real ingest app (produce deadline 2 s) and give up on an
answer after CLIENT_TIMEOUT (0.5 s), far less than the deadline, then retry the same key and body
until they get a 2xx, as an SDK does. Meanwhile the private Tansu broker is frozen twice:
- SHORT_STALL (1.2 s): shorter than the produce deadline. The first attempt times out at the
  client, but ingest's write succeeds when the broker thaws: the retries meet a 409 while it is in
  flight, then the stored 202 replayed (`Idempotent-Replayed: true`), writing nothing again;
- LONG_STALL (4 s): longer than the deadline. Ingest answers the first attempt (which nobody
  reads) with a 503, which is not stored, so a later retry really writes; the producer may also
  deliver the first attempt's records once the broker thaws. Those copies carry the same event
  ids (their own, or derived from the key and index), so the consumer (TALLY_DEDUP=true) counts
  each event once.

Exact counts: the topic holds, as distinct event ids, exactly the events of the batches (all of
which end with a 2xx), whatever copies there are; the rollups equal the oracle's aggregates of
exactly those events, each once; `tally_seen_events` holds each id once.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from core import devstack
from core.migrate import migrate
from core.settings import Settings
from ingest.app import create_app as ingest_app
from ingest.idempotency import derived_event_id
from tests import oracle
from tests.conftest import serve
from tests.fault.support import (
    Ledger,
    assert_rollups_exact,
    deliver,
    now_ms,
    seeded,
    seen_ids,
    start_consumer,
    topic_ends,
    until,
    wait_caught_up,
)
from tests.kafka_read import read_topic

pytestmark = pytest.mark.fault

PRODUCE_TIMEOUT = 2.0
CLIENT_TIMEOUT = 0.5
SHORT_STALL = 1.2
LONG_STALL = 4.0
PRODUCERS = 3


async def producer(http: httpx.AsyncClient, ledger: Ledger, rng: random.Random, name: str, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        events = oracle.make_events(rng, 30, now_ms())
        await deliver(http, ledger, ledger.new(events, f"{name}-{n}"), timeout=CLIENT_TIMEOUT)
        n += 1
        await asyncio.sleep(0.02)


def event_ids(ledger: Ledger) -> list[str]:
    """The id each accepted event has in Kafka: its own, or the one ingest derives from the key."""
    return [
        str(e.get("event_id") or derived_event_id("anonymous", b.key or "", index))
        for i in sorted(ledger.accepted)
        for b in [ledger.batches[i]]
        for index, e in enumerate(b.events)
    ]


async def test_retries_after_client_timeouts_count_once(
    settings: Settings, private_broker: devstack.EmbeddedServer, tmp_path: Path
) -> None:
    seed, why = seeded()
    config = settings.model_copy(
        update={
            "kafka_bootstrap": private_broker.url,
            "produce_timeout_seconds": PRODUCE_TIMEOUT,
            "kafka_breaker_seconds": 0.5,
            "dedup": True,
        }
    )
    await migrate(config)
    consumer = await start_consumer(config, tmp_path)
    broker = private_broker.process
    assert broker is not None
    ledger = Ledger()
    stalls: list[tuple[float, float]] = []

    async def stall(seconds: float) -> None:
        frozen = time.monotonic()
        broker.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            broker.send_signal(signal.SIGCONT)
            stalls.append((frozen, time.monotonic()))

    try:
        async with (
            serve(ingest_app(config)) as ingest_url,
            httpx.AsyncClient(base_url=ingest_url, timeout=30) as ingest,
        ):
            stop = asyncio.Event()
            rngs = [random.Random(seed + i) for i in range(PRODUCERS)]
            tasks = [
                asyncio.create_task(producer(ingest, ledger, rngs[i], f"p{seed}-{i}", stop)) for i in range(PRODUCERS)
            ]
            try:
                for seconds in (SHORT_STALL, LONG_STALL):
                    mark = len(ledger.accepted)
                    await until(lambda m=mark: len(ledger.accepted) >= m + 10, 30, "batches accepted")
                    await stall(seconds)
                mark = len(ledger.accepted)
                await until(lambda: len(ledger.accepted) >= mark + 10, 30, "batches accepted after the stalls")
            finally:
                stop.set()
                await asyncio.gather(*tasks)
        # Ingest closed, its producer flushed: every copy that will ever reach the topic is there.
        ends = await topic_ends(config)
        in_topic = await read_topic(config.kafka_bootstrap or "", config.topic, expect_events=len(ledger.events()))
        caught_up = await wait_caught_up(config, ends, [consumer], why)
    finally:
        code = consumer.stop()

    events = ledger.events()
    ids = event_ids(ledger)
    copies = Counter(str(e["event_id"]) for e, _ in in_topic)
    per_batch = Counter(a.batch for a in ledger.attempts)
    timed_out = [a for a in ledger.attempts if a.status == 0]
    replayed = [a for a in ledger.attempts if a.status == 202 and a.headers.get("idempotent-replayed") == "true"]
    statuses = Counter(a.status for a in ledger.attempts)
    print(
        f"{why}: {len(ledger.batches)} batches, {len(ledger.attempts)} attempts {dict(statuses)} "
        f"(0 = client timeout); {len(replayed)} answers replayed; at most {max(per_batch.values())} attempts "
        f"for one batch; {sum(copies.values()) - len(copies)} duplicate events in the topic; "
        f"caught up in {caught_up:.1f} s"
    )

    assert ledger.refused() == [], why
    assert len(stalls) == 2, why
    # The retries were real: answers lost to client timeouts, refusals, and answers replayed by ingest.
    assert len(timed_out) >= PRODUCERS, (why, statuses)
    assert replayed, (why, statuses)
    assert statuses[503] >= 1, (why, statuses)  # the long stall: refusals, not stored, retried
    # Kafka holds exactly the accepted events as distinct ids, however many copies.
    assert len(set(ids)) == len(ids) == len(events), why
    assert set(copies) == set(ids), why
    # The long stall's first attempts reached the topic after the thaw, beside their retries: the
    # exact counts below rest on de-duplication by event_id, not on luck.
    assert sum(copies.values()) > len(copies), (why, statuses)
    # Counted exactly once.
    assert code == 0, why
    await assert_rollups_exact(config, events, why)
    assert await seen_ids(config) == len(events), why
