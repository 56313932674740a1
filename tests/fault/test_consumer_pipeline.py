"""kill -9 a consumer while batch N commits and batch N+1 is already decoded and aggregated.

The runner pipelines (consumers/runner.py): while N's transaction runs, the next polls are
prepared into N+1. This test makes that moment last: a second Postgres session holds a lock
that N's upserts wait for, so N has moved its offsets inside its transaction but cannot
commit, while the test produces N+1's records and waits until the consumer reports them
prepared (`tally_consumer_prepared_events`). Then SIGKILL, the lock is released, a new
consumer takes over: the rollups must equal the oracle of every acknowledged event, exactly
once, and the stored offsets the log's ends.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from core.migrate import migrate
from core.settings import Settings
from schemas.envelope import headers as envelope_headers
from schemas.envelope import pack
from schemas.events import normalize_event
from tests import oracle
from tests.fault.support import assert_rollups_exact, seeded, start_consumer, wait_caught_up
from tests.integration.consumer_helpers import stored_offsets

pytestmark = pytest.mark.fault

PARTITIONS = 2


async def produce(settings: Settings, rng: random.Random, envelopes: int, ends: dict[int, int]) -> list[dict[str, Any]]:
    """`envelopes` records of 50 events, acks=all; the events acknowledged (and `ends` moved)."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    acked: list[dict[str, Any]] = []
    try:
        for i in range(envelopes):
            now = int(time.time() * 1000)
            encoded = [normalize_event(r, now, settings.event_limits) for r in oracle.make_events(rng, 50, now)]
            meta = await (await producer.send(settings.topic, next(pack(encoded, 1 << 30)), partition=i % PARTITIONS,
                                              headers=envelope_headers(f"req-{i}")))
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
            acked += [orjson.loads(e) for e in encoded]
    finally:
        await producer.stop()
    return acked


async def prepared_events(port: int) -> float:
    async with httpx.AsyncClient(timeout=2) as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    for line in text.splitlines():
        if line.startswith("tally_consumer_prepared_events "):
            return float(line.split()[1])
    return 0.0


async def until(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_kill_9_while_a_batch_commits_and_the_next_is_prepared(settings: Settings, tmp_path: Path) -> None:
    seed, why = seeded()
    rng = random.Random(seed)
    config = settings.model_copy(update={"topic_partitions": PARTITIONS})
    await migrate(config)
    ends: dict[int, int] = {}
    acked = await produce(config, rng, 4, ends)
    first = await start_consumer(config, tmp_path)
    second = None
    blocker = await asyncpg.connect(config.postgres_url)
    watcher = await asyncpg.connect(config.postgres_url)
    try:
        await wait_caught_up(config, ends, [first], why)
        # Batch N: its upserts wait for this lock, inside a transaction that has already moved the offsets.
        blocked = blocker.transaction()
        await blocked.start()
        await blocker.execute("LOCK TABLE agg_events_by_type IN SHARE ROW EXCLUSIVE MODE")
        before = dict(ends)
        acked += await produce(config, rng, 2, ends)

        async def n_waits() -> bool:
            return bool(await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tally-consumer' "
                "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO \"agg_events_by_type\"%'"))

        await until(n_waits, "batch N to wait for the lock inside its transaction")
        # Batch N+1: produced while N cannot commit, decoded and aggregated meanwhile.
        acked += await produce(config, rng, 6, ends)

        async def n1_prepared() -> bool:
            return await prepared_events(first.port) > 0

        await until(n1_prepared, "batch N+1 to be prepared")
        assert await n_waits(), why  # N is still uncommitted at the kill
        await asyncio.to_thread(first.kill)
        assert await stored_offsets(config) == before, why  # nothing of N or N+1 committed
        await blocked.rollback()

        second = await start_consumer(config, tmp_path)
        await wait_caught_up(config, ends, [second], why)
        assert await stored_offsets(config) == ends, why
        await assert_rollups_exact(config, acked, why)
    finally:
        await blocker.close()
        await watcher.close()
        codes = [p.stop() for p in (first, second) if p is not None]
    assert codes[-1] == 0, why
