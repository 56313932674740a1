"""De-duplication by event_id against real Kafka-protocol and Postgres servers: exact counts, claims that
commit and roll back with the offsets, the UTC midnight hand-over, and expiry that never blocks a claim."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import UTC, date, datetime, timedelta

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text

from consumers.aggregate import aggregate, compile_rollups
from consumers.batch import prepare
from consumers.dedup import Candidates, partition_name
from consumers.dedup_store import Dedup, claim, claim_ids, ensure_partitions, expire_partitions
from consumers.flush import Flusher
from consumers.registry import registry_version
from core.db import write_engine
from core.settings import Settings
from schemas.envelope import pack
from tests.integration.consumer_helpers import (
    assert_tables_match,
    consumer_settings,
    envelopes,
    make_events,
    produce,
    running,
    stored_offsets,
    wait_for_offsets,
)
from tests.records import Rec, views

pytestmark = pytest.mark.integration


def duplicates_counted() -> float:
    return REGISTRY.get_sample_value("tally_consumer_duplicates_total") or 0.0


async def seen_rows(settings: Settings) -> list[tuple[str, date]]:
    conn = await asyncpg.connect(settings.postgres_url)
    try:
        rows = await conn.fetch("SELECT event_id::text, day FROM tally_seen_events ORDER BY day, event_id")
    finally:
        await conn.close()
    return [(r[0], r[1]) for r in rows]


async def test_retried_events_count_once_across_batches_partitions_and_within_a_record(migrated: Settings) -> None:
    settings = consumer_settings(migrated, dedup=True, batch_max_records=5)
    rng = random.Random(21)
    originals = make_events(400, rng)
    records = [(i % 4, v) for i, v in enumerate(envelopes(originals, 10))]
    # A producer retrying: some chunks again, regrouped, on other partitions; one record holding an event twice.
    retried = rng.sample(originals, 120)
    records += [(3 - i % 4, v) for i, v in enumerate(envelopes(retried, 7))]
    records.append((2, next(pack([originals[0], originals[1], originals[0]], 1 << 30))))
    before = duplicates_counted()
    ends = await produce(settings, records)

    async with running(settings) as (_, task):
        await wait_for_offsets(settings, ends, [task])

    await assert_tables_match(settings, [orjson.loads(e) for e in originals])
    assert duplicates_counted() - before == 120 + 3
    ids = {orjson.loads(e)["event_id"] for e in originals}
    assert {event_id for event_id, _ in await seen_rows(settings)} == ids

    # More of the same later (a retry after a restart) is still recognised; new events still count.
    more = make_events(50, rng)
    ends = await produce(settings, [(0, v) for v in envelopes(rng.sample(originals, 30) + more, 16)])
    async with running(consumer_settings(settings)) as (_, task):
        await wait_for_offsets(settings, ends, [task])
    await assert_tables_match(settings, [orjson.loads(e) for e in originals + more])
    assert duplicates_counted() - before == 120 + 3 + 30


async def test_claims_roll_back_with_a_fenced_batch_and_reaggregate_only_when_needed(migrated: Settings) -> None:
    settings = migrated
    topic = settings.topic
    plans = compile_rollups(settings.rollups)
    engine = write_engine(str(settings.postgres_url))

    dedup = Dedup(engine, 24)
    flusher = Flusher(engine, settings.consumer_group, plans, version=await registry_version(engine, settings.rollups),
                      dedup=dedup)
    try:
        conn = await asyncpg.connect(settings.postgres_url)
        try:
            await conn.execute(
                "INSERT INTO tally_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, 0, 2)",
                settings.consumer_group, topic,
            )
        finally:
            await conn.close()
        first = make_events(20, random.Random(22))
        stale = prepare({(topic, 0): [Rec(0, envelopes(first, 20)[0], topic)]}, {(topic, 0): 0}, plans, dedup=True)
        assert await flusher.flush(stale) is False
        assert await seen_rows(settings) == []  # the claims rolled back with the fenced offsets

        fresh = prepare({(topic, 0): [Rec(2, envelopes(first, 20)[0], topic)]}, {(topic, 0): 2}, plans, dedup=True)
        assert await flusher.flush(fresh) is True
        assert fresh.duplicates == 0
        assert len(await seen_rows(settings)) == 20

        # Half old, half new: only the new half is counted, aggregated afresh.
        second = make_events(20, random.Random(23))
        mixed = prepare({(topic, 0): [Rec(3, envelopes(first[::2] + second, 40)[0], topic)]}, {(topic, 0): 3}, plans,
                        dedup=True)
        assert await flusher.flush(mixed) is True
        assert mixed.duplicates == 10
        await assert_tables_match(settings, [orjson.loads(e) for e in first + second])
        assert await stored_offsets(settings) == {0: 4}
    finally:
        await dedup.close()
        await engine.dispose()


async def test_the_common_case_reuses_the_aggregates_computed_before_the_transaction(migrated: Settings) -> None:
    plans = compile_rollups(migrated.rollups)
    engine = write_engine(str(migrated.postgres_url))
    try:
        await ensure_partitions(engine)
        events = views(plans, [orjson.loads(e) for e in make_events(30, random.Random(24))])
        computed = aggregate(plans, events)
        async with engine.begin() as conn:
            fresh = await claim(conn, Candidates.of(events), computed, plans, window_hours=24, opened=time.monotonic())
        assert fresh.aggregates is computed and fresh.duplicates == 0
        async with engine.begin() as conn:
            retried = Candidates.of([*events[:10], *views(plans, [{"type": "new", "ts": 0}])])
            again = await claim(conn, retried, computed, plans, window_hours=24, opened=time.monotonic())
        assert again.duplicates == 10
        assert again.aggregates == aggregate(plans, views(plans, [{"type": "new", "ts": 0}]))
    finally:
        await engine.dispose()


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def new_ids(n: int) -> list[str]:
    return sorted(str(uuid.uuid4()) for _ in range(n))


async def test_the_utc_midnight_hand_over_and_the_window(migrated: Settings) -> None:
    engine = write_engine(str(migrated.postgres_url))
    day = date(2026, 3, 1)
    x, y, z, w = new_ids(4)
    try:
        await ensure_partitions(engine, today=day - timedelta(days=2))  # 02-26 .. 03-01
        await ensure_partitions(engine, today=day)  # .. 03-03

        async def seen(ids: list[str], at: datetime, window_hours: int = 24) -> list[str]:
            async with engine.begin() as conn:
                started, already = await claim_ids(conn, ids, window_hours=window_hours, at=at)
            assert started == at
            return sorted(already)

        assert await seen([w], utc(2026, 2, 26, 12)) == []
        assert await seen([x], utc(2026, 3, 1, 23, 50)) == []
        # In the first 30 minutes of 03-02, ids are claimed in 03-01's partition as well: x is found there.
        assert await seen([x, y], utc(2026, 3, 2, 0, 5)) == [x]
        assert (y, day) in await seen_rows(migrated) and (y, day + timedelta(days=1)) in await seen_rows(migrated)
        # After the margin, yesterday's partition is looked at; the day before is outside a 24 h window...
        assert await seen([x, y, z, w], utc(2026, 3, 2, 0, 45)) == [x, y]
        # ...and inside a 96 h one (w was counted again just now, so look from a day on).
        assert await seen([w], utc(2026, 3, 3, 1), window_hours=96) == [w]
        assert await seen([z], utc(2026, 3, 3, 1), window_hours=1) == [z]  # yesterday is always checked
    finally:
        await engine.dispose()


@pytest.mark.parametrize("first_commits", [True, False])
async def test_claims_on_either_side_of_midnight_meet_on_one_index(migrated: Settings, first_commits: bool) -> None:
    """A claim from 23:59:59 still open when one from 00:00:01 arrives: the second waits for the first."""
    engine = write_engine(str(migrated.postgres_url), pool_size=3)
    (v,) = new_ids(1)
    try:
        await ensure_partitions(engine, today=date(2026, 3, 1))
        async with engine.connect() as first:
            txn = await first.begin()
            assert (await claim_ids(first, [v], window_hours=24, at=utc(2026, 3, 1, 23, 59, 59)))[1] == []

            async def second() -> list[str]:
                async with engine.begin() as conn:
                    return (await claim_ids(conn, [v], window_hours=24, at=utc(2026, 3, 2, 0, 0, 1)))[1]

            task = asyncio.create_task(second())
            await asyncio.sleep(0.5)
            assert not task.done()  # blocked on the first claim's row in 03-01's partition
            await (txn.commit() if first_commits else txn.rollback())
            assert await asyncio.wait_for(task, 10) == ([v] if first_commits else [])
    finally:
        await engine.dispose()


async def test_expiry_drops_old_days_and_never_blocks_a_claim(migrated: Settings) -> None:
    engine = write_engine(str(migrated.postgres_url), pool_size=4)
    today = date(2026, 3, 10)
    try:
        for back in range(6, 0, -1):
            await ensure_partitions(engine, today=today - timedelta(days=back))  # 03-03 .. 03-11
        async with engine.begin() as conn:
            await claim_ids(conn, new_ids(3), window_hours=24, at=utc(2026, 3, 5, 12))
            # An expiry that detached a table and stopped before dropping it leaves it behind.
            await conn.execute(text("CREATE TABLE tally_seen_events_p20260301 (LIKE tally_seen_events)"))

        async with engine.connect() as open_claim:
            txn = await open_claim.begin()
            await claim_ids(open_claim, new_ids(5), window_hours=24, at=utc(2026, 3, 10, 12))
            expiry = asyncio.create_task(expire_partitions(engine, 24, today=today))
            await asyncio.sleep(0.5)
            assert not expiry.done()  # DETACH ... CONCURRENTLY waits for the open transaction to end,
            async with asyncio.timeout(5), engine.begin() as conn:  # while other claims carry on at once
                assert (await claim_ids(conn, new_ids(5), window_hours=24, at=utc(2026, 3, 10, 12, 1)))[1] == []
            await txn.commit()
        dropped = await asyncio.wait_for(expiry, 30)
        old = [today - timedelta(days=d) for d in range(7, 1, -1)]  # 03-03 .. 03-08
        assert dropped == [partition_name(d) for d in old] + ["tally_seen_events_p20260301"]
        async with engine.connect() as conn:
            names = (await conn.execute(text(
                "SELECT c.relname FROM pg_class c WHERE c.relname LIKE 'tally_seen_events_p%' AND c.relkind = 'r' "
                "ORDER BY 1"))).scalars().all()
        assert names == [partition_name(today + timedelta(days=d)) for d in (-1, 0, 1)]
        assert len(await seen_rows(migrated)) == 10
    finally:
        await engine.dispose()
