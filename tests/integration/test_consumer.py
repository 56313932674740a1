"""The consumer against real Kafka-protocol and Postgres servers: exact rollups, fencing, DLQ, restarts."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import REGISTRY
from sqlalchemy import text

from consumers import flush
from consumers.aggregate import compile_rollups
from consumers.batch import prepare
from consumers.flush import Flusher
from consumers.main import run
from consumers.registry import registry_version
from core.db import write_engine
from core.settings import Settings
from schemas.envelope import pack, unpack
from tests.integration.consumer_helpers import (
    assert_tables_match,
    consumer_settings,
    envelopes,
    make_events,
    now_ms,
    produce,
    running,
    spread,
    stored_offsets,
    table,
    wait_for_offsets,
)
from tests.records import Rec

pytestmark = pytest.mark.integration


async def test_rollups_equal_the_events_exactly_and_offsets_reach_the_end(migrated: Settings) -> None:
    settings = consumer_settings(migrated, batch_max_records=7)
    encoded = make_events(600, random.Random(1))
    ends = await produce(settings, spread(envelopes(encoded, 9), settings.topic_partitions))
    assert sorted(ends) == [0, 1, 2, 3]

    async with running(settings) as (_, task):
        await wait_for_offsets(settings, ends, [task])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.consumer_metrics_port}") as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"] == {"kafka": True, "postgres": True}
            scraped = (await client.get("/metrics")).text
        assert "tally_consumer_events_applied_total" in scraped
        assert f'tally_consumer_lag_records{{partition="0",topic="{settings.topic}"}} 0.0' in scraped

    assert await stored_offsets(settings) == ends
    await assert_tables_match(settings, [orjson.loads(e) for e in encoded])


async def test_a_zombie_batch_is_fenced_and_changes_nothing(migrated: Settings) -> None:
    """A consumer that lost its partition still holds a batch; another consumer has moved the offset on."""
    settings = migrated
    topic = settings.topic

    value = envelopes(make_events(5, random.Random(2)), 5)[0]
    polled = {(topic, 0): [Rec(5, value, topic), Rec(6, value, topic)], (topic, 1): [Rec(3, value, topic, 1)]}
    plans = compile_rollups(settings.rollups)
    engine = write_engine(str(settings.postgres_url))
    try:
        conn = await asyncpg.connect(settings.postgres_url)
        try:
            # The zombie loaded 5 and 3; partition 0 has since been advanced to 7 by its new owner.
            await conn.executemany(
                "INSERT INTO tally_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, $3, $4)",
                [(settings.consumer_group, topic, 0, 7), (settings.consumer_group, topic, 1, 3)],
            )
        finally:
            await conn.close()
        version = await registry_version(engine, settings.rollups)
        flusher = Flusher(engine, settings.consumer_group, plans, version=version)
        fenced_before = REGISTRY.get_sample_value("tally_consumer_fenced_total") or 0.0

        stale = prepare(polled, {(topic, 0): 5, (topic, 1): 3}, plans)
        assert await flusher.flush(stale) is False
        assert REGISTRY.get_sample_value("tally_consumer_fenced_total") == fenced_before + 1
        assert await table(settings, "agg_events_by_type") == {}
        assert await table(settings, "agg_page_views") == {}
        assert await stored_offsets(settings) == {0: 7, 1: 3}  # partition 1 did not move either

        # The same records from the right start apply once (the control).
        fresh = prepare({(topic, 1): polled[(topic, 1)]}, {(topic, 1): 3}, plans)
        assert await flusher.flush(fresh) is True
        assert await stored_offsets(settings) == {0: 7, 1: 4}
        assert sum(n for n, *_ in (await table(settings, "agg_events_by_type")).values()) == 5
        assert await flusher.flush(fresh) is False  # and never twice
        assert sum(n for n, *_ in (await table(settings, "agg_events_by_type")).values()) == 5
    finally:
        await engine.dispose()


async def read_dlq(settings: Settings, count: int, timeout: float = 30.0) -> list[Any]:
    consumer = AIOKafkaConsumer(settings.dlq_topic, bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    out: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(records)
        await asyncio.sleep(0.3)  # anything beyond `count` would show up here
        for records in (await consumer.getmany(timeout_ms=200)).values():
            out.extend(records)
    finally:
        await consumer.stop()
    return out


async def test_bad_records_and_events_go_to_the_dlq_and_never_stop_a_partition(migrated: Settings) -> None:
    settings = consumer_settings(migrated, batch_max_records=4)
    rng = random.Random(3)
    received = now_ms()
    invalid_events = [{"type": "no_ts"}, {"type": "x", "ts": "yesterday"}, "not an object", {"ts": received}]
    garbage = [b"not json at all", b'{"v":2,"events":[]}', b'{"v":1,"events":"nope"}', b"[]"]
    good: list[bytes] = []
    records: list[tuple[int, bytes]] = []
    for i in range(40):
        chunk = make_events(6, rng, received)
        good += chunk
        if i % 10 == 3:  # a good envelope with one invalid event in the middle
            bad = orjson.dumps(invalid_events[(i // 10) % len(invalid_events)])
            records.append((i % 4, next(pack([*chunk[:3], bad, *chunk[3:]], 1 << 30))))
        else:
            records.append((i % 4, envelopes(chunk, 6)[0]))
        if i % 10 == 7:
            records.append((i % 4, garbage[(i // 10) % len(garbage)]))
    ends = await produce(settings, records)
    reasons = ("undecodable", "bad_ts", "not_object", "bad_type")
    before = {r: REGISTRY.get_sample_value("tally_dlq_records_total", {"reason": r}) or 0.0 for r in reasons}

    async with running(settings) as (_, task):
        await wait_for_offsets(settings, ends, [task])

    assert await stored_offsets(settings) == ends
    await assert_tables_match(settings, [orjson.loads(e) for e in good])
    counted = {r: (REGISTRY.get_sample_value("tally_dlq_records_total", {"reason": r}) or 0.0) - before[r]
               for r in reasons}
    assert counted == {"undecodable": 4, "bad_ts": 2, "not_object": 1, "bad_type": 1}

    dead = await read_dlq(settings, 8)
    assert len(dead) == 8
    by_kind: dict[str, list[Any]] = {"undecodable": [], "event": []}
    for record in dead:
        headers = dict(record.headers)
        assert headers["tally-error"]
        assert headers["tally-source-topic"] == settings.topic.encode()
        source = (int(headers["tally-source-partition"]), int(headers["tally-source-offset"]))
        assert source[1] < ends[source[0]]
        by_kind["undecodable" if record.value in garbage else "event"].append(record)
    assert sorted(r.value for r in by_kind["undecodable"]) == sorted(garbage)
    assert sorted(orjson.dumps(unpack(r.value)) for r in by_kind["event"]) == sorted(
        orjson.dumps([e]) for e in invalid_events
    )
    assert all(dict(r.headers)["tally-schema"] == b"1" for r in by_kind["event"])


async def test_a_restarted_consumer_continues_exactly_where_the_last_commit_left(migrated: Settings) -> None:
    # Tansu ignores LeaveGroup: the old member's partitions move when its session expires.
    settings = consumer_settings(migrated, batch_max_records=3, session_timeout_ms=3_000, heartbeat_interval_ms=300)
    rng = random.Random(4)
    first = make_events(400, rng)
    ends = await produce(settings, spread(envelopes(first, 4), 4))
    total = sum(ends.values())

    async with running(settings) as (stop, task):
        while sum((await stored_offsets(settings)).values()) < total // 4:
            assert not task.done()
            await asyncio.sleep(0.01)
        stop.set()  # mid-stream: the batch in flight is finished and committed
        await asyncio.wait_for(task, 30)
    reached = await stored_offsets(settings)
    assert 0 < sum(reached.values()) < total

    second = make_events(200, rng)  # more arrives while no consumer runs
    more = await produce(settings, spread(envelopes(second, 4), 4))
    async with running(consumer_settings(settings)) as (_, task):
        await wait_for_offsets(settings, more, [task])
    assert await stored_offsets(settings) == more
    await assert_tables_match(settings, [orjson.loads(e) for e in first + second])


async def test_two_consumers_share_partitions_and_one_crashing_loses_nothing(migrated: Settings) -> None:
    """Two members of one group; one is cancelled mid-stream (a crash), the other takes over its partitions."""
    settings = consumer_settings(migrated, batch_max_records=2, session_timeout_ms=3_000, heartbeat_interval_ms=300)
    rng = random.Random(5)
    events = make_events(800, rng)
    ends = await produce(settings, spread(envelopes(events, 4), 4))
    total = sum(ends.values())

    async with running(settings) as (_, survivor):
        crashing = asyncio.create_task(run(consumer_settings(settings)))
        while sum((await stored_offsets(settings)).values()) < total // 3:
            await asyncio.sleep(0.01)
        crashing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await crashing
        await wait_for_offsets(settings, ends, [survivor], timeout=90)
    assert await stored_offsets(settings) == ends
    await assert_tables_match(settings, [orjson.loads(e) for e in events])


async def test_start_up_waits_for_migrations_instead_of_crashing(settings: Settings) -> None:
    from core.migrate import migrate

    config = consumer_settings(settings)
    event = {"type": "click", "ts": now_ms(), "properties": {"amount": 2.5}}
    async with running(config) as (_, task):
        await asyncio.sleep(0.5)
        assert not task.done()  # no tables yet: waiting, not dead
        await migrate(config)
        ends = await produce(config, [(0, next(pack([orjson.dumps(event)], 1 << 20)))])
        await wait_for_offsets(config, ends, [task])
    rows = await table(config, "agg_events_by_type")
    minute = datetime.fromtimestamp(event["ts"] // 60_000 * 60, UTC)  # type: ignore[operator]
    assert rows == {(minute, "click", ""): (1, Decimal("2.5"), Decimal("2.5"), Decimal("2.5"))}


async def test_the_process_applies_then_drains_on_sigterm_and_exits_zero(migrated: Settings) -> None:
    """`main()` as `tally consume` runs it: its own signal handlers, metrics port, clean exit."""
    config = consumer_settings(migrated)
    env = {**os.environ, **config.to_env()}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from consumers.main import main; main()", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        ends = await produce(config, [(p, envelopes(make_events(20, random.Random(p)), 20)[0]) for p in range(4)])
        await wait_for_offsets(config, ends)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{config.consumer_metrics_port}") as client:
            assert (await client.get("/readyz")).status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert b"consumer stopped" in stderr
    assert sum(n for n, *_ in (await table(config, "agg_events_by_type")).values()) == 80


@pytest.mark.parametrize("copy_min_rows", [1, 10**9], ids=["stage", "unnest"])
async def test_upserts_through_the_stage_or_unnest_are_exact_and_roll_back_when_fenced(
    migrated: Settings, monkeypatch: pytest.MonkeyPatch, copy_min_rows: int
) -> None:
    """Both ways of writing cells (COPY into the staging table, then INSERT ... SELECT; or unnest) on one
    pooled connection: exact sums over new and existing rows, and nothing left behind by a fenced batch."""
    monkeypatch.setattr(flush, "COPY_MIN_ROWS", copy_min_rows)
    settings, topic = migrated, migrated.topic

    encoded = make_events(400, random.Random(7))
    values = envelopes(encoded, 50)  # 8 records
    records = [Rec(i, v, topic) for i, v in enumerate(values + values)]  # offsets 8..15 repeat the events
    events = [orjson.loads(e) for e in encoded]
    plans = compile_rollups(settings.rollups)
    engine = write_engine(str(settings.postgres_url), pool_size=1)  # one connection: its stage is reused
    try:
        version = await registry_version(engine, settings.rollups)
        flusher = Flusher(engine, settings.consumer_group, plans, version=version)
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO tally_offsets (group_id, topic, partition, next_offset) "
                                    "VALUES (:g, :t, 0, 0)"), {"g": settings.consumer_group, "t": topic})
        tp = (topic, 0)
        assert await flusher.flush(prepare({tp: records[:4]}, {tp: 0}, plans)) is True
        await assert_tables_match(settings, events[:200])
        assert await flusher.flush(prepare({tp: records[4:8]}, {tp: 3}, plans)) is False  # a zombie's
        await assert_tables_match(settings, events[:200])
        assert await flusher.flush(prepare({tp: records[4:8]}, {tp: 4}, plans)) is True
        assert await flusher.flush(prepare({tp: records[8:]}, {tp: 8}, plans)) is True
        await assert_tables_match(settings, events + events)
        assert await stored_offsets(settings) == {0: 16}
        async with engine.connect() as conn:  # the stage holds nothing between transactions
            staged = (await conn.execute(text("SELECT to_regclass('tally_stage_events_by_type')"))).scalar()
            assert (staged is not None) == (copy_min_rows == 1)
            if staged is not None:
                assert (await conn.execute(text("SELECT count(*) FROM tally_stage_events_by_type"))).scalar() == 0
    finally:
        await engine.dispose()
