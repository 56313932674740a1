"""Coarse tables, the write side (issue 18, item 2): the consumer keeps `agg_<name>__hour`/`__day`
exact at every commit, `tally migrate` fills a granularity added to a populated rollup and
fences consumers started with the old file, and backfill writes them too.

The property: random events through the consumer's real prepare + flush (unnest and COPY
paths, with and without de-duplication, split into random batches) into real Postgres;
then every coarse table equals its base table re-bucketed by SQL's date_trunc, exactly,
NULL sums/mins/maxes included.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from consumers import flush
from consumers.aggregate import compile_rollups
from consumers.batch import prepare
from consumers.dedup_store import Dedup
from consumers.flush import Flusher
from consumers.registry import NotRegistered, StaleRollups, registry_version
from core.coarse import fill_coarse_tables_at
from core.db import write_engine
from core.migrate import migrate, migrate_database
from core.retention import format_report, run_retention
from core.settings import Settings
from schemas.events import EventLimits, normalize_event
from tests.integration.coarse_support import assert_coarse_exact, reset_tables, with_rollups
from tests.integration.consumer_helpers import envelopes
from tests.records import Rec

pytestmark = pytest.mark.integration

BASE = """
[[rollup]]
name = "by_type"
dimensions = ["type", "source"]
measures = ["count", "sum:properties.amount", "min:properties.amount", "max:properties.amount"]
{extra}

[[rollup]]
name = "pages"
granularities = ["day", "hour"]
where = {{ type = "page_view" }}
dimensions = ["properties.country"]
measures = ["count"]
"""
COARSE = BASE.format(extra='granularities = ["minute", "hour", "day"]')
PLAIN = BASE.format(extra="")
RECEIVED = 1_796_000_000_000  # 2026-11-30T...: events span the 2.5 days before it (days, hours, minutes)
SPAN = 60 * 3_600_000
TOPIC = "events"

_AMOUNT = st.one_of(
    st.none(),
    st.integers(-1000, 1000),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from(["12", True, 2**62, 0.1, -0.0, 1e-9]),
)
_EVENT = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["click", "page_view", "buy"]),
        # clustered near hour and day edges as well as anywhere
        "ts": st.one_of(
            st.integers(RECEIVED - SPAN, RECEIVED),
            st.integers(0, 60).map(lambda h: RECEIVED - RECEIVED % 86_400_000 - h * 3_600_000 - 1),
        ),
        "source": st.sampled_from([None, "web", "ios"]),
        "amount": _AMOUNT,
        "country": st.sampled_from([None, "DE", "FR"]),
        "id": st.integers(0, 40),
    }
)


def _encode(e: dict[str, Any], with_id: bool) -> bytes:
    raw: dict[str, Any] = {"type": e["type"], "ts": e["ts"]}
    if e["source"] is not None:
        raw["source"] = e["source"]
    props = {k: e[k] for k in ("amount", "country") if e[k] is not None}
    if props:
        raw["properties"] = props
    if with_id:
        raw["event_id"] = f"00000000-0000-4000-8000-{e['id']:012d}"
    return normalize_event(raw, RECEIVED, EventLimits())


@pytest.fixture
async def coarse(settings: Settings, tmp_path: Path) -> Settings:
    s = with_rollups(settings, tmp_path, COARSE)
    await migrate_database(s)
    return s


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    events=st.lists(_EVENT, min_size=1, max_size=120),
    cuts=st.lists(st.integers(1, 60), min_size=1, max_size=6),
    per_record=st.integers(1, 9),
    copy_from=st.sampled_from([1, 3, flush.COPY_MIN_ROWS]),
    dedup=st.booleans(),
)
async def test_every_coarse_table_is_the_base_table_rebucketed_after_random_batches(
    coarse: Settings,
    events: list[dict[str, Any]],
    cuts: list[int],
    per_record: int,
    copy_from: int,
    dedup: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flush, "COPY_MIN_ROWS", copy_from)  # the COPY staging path, per table, as well
    plans = compile_rollups(coarse.rollups)
    records = envelopes([_encode(e, dedup) for e in events], per_record)
    engine = write_engine(str(coarse.postgres_url))
    dedupe = Dedup(engine, 24) if dedup else None
    conn = await asyncpg.connect(str(coarse.postgres_url))
    try:
        await reset_tables(conn, TOPIC, coarse)
        flusher = Flusher(
            engine, coarse.consumer_group, plans, version=await registry_version(engine, coarse.rollups), dedup=dedupe
        )
        offset, i = 0, 0
        while offset < len(records):
            n = cuts[i % len(cuts)]
            i += 1
            polled = {(TOPIC, 0): [Rec(o, records[o], TOPIC) for o in range(offset, min(offset + n, len(records)))]}
            batch = prepare(polled, {(TOPIC, 0): offset}, plans, dedup=dedup, now_ms=RECEIVED)
            assert await flusher.flush(batch) is True
            offset = batch.advances[0].new
        assert await assert_coarse_exact(coarse) > 0
        counted = await conn.fetchval("SELECT coalesce(sum(count), 0) FROM agg_by_type__day")
        assert counted == (len({e["id"] for e in events}) if dedup else len(events))
    finally:
        await conn.close()
        if dedupe is not None:
            await dedupe.close()
        await engine.dispose()


async def _populate(s: Settings, n: int, seed: int) -> int:
    """`n` events through the consumer path (a fresh group's partition 0), from offset 0."""
    plans = compile_rollups(s.rollups)
    rng = random.Random(seed)
    events = [
        {"type": rng.choice(["click", "page_view"]), "ts": RECEIVED - rng.randrange(SPAN), "source": None,
         "amount": rng.choice([None, 3, 2.5, -1]), "country": rng.choice([None, "DE"]), "id": 0}
        for _ in range(n)
    ]
    records = envelopes([_encode(e, False) for e in events], 10)
    engine = write_engine(str(s.postgres_url))
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO tally_offsets (group_id, topic, partition, next_offset) VALUES (:g, :t, 0, 0) "
                     "ON CONFLICT DO NOTHING"),
                {"g": s.consumer_group, "t": TOPIC},
            )
        flusher = Flusher(engine, s.consumer_group, plans, version=await registry_version(engine, s.rollups))
        polled = {(TOPIC, 0): [Rec(o, r, TOPIC) for o, r in enumerate(records)]}
        assert await flusher.flush(prepare(polled, {(TOPIC, 0): 0}, plans, now_ms=RECEIVED))
    finally:
        await engine.dispose()
    return len(records)


async def _registry(s: Settings) -> tuple[int, str | None]:
    conn = await asyncpg.connect(str(s.postgres_url))
    try:
        return (
            await conn.fetchval("SELECT value FROM tally_meta WHERE key = 'rollups_version'"),
            await conn.fetchval("SELECT granularities FROM tally_rollups WHERE name = 'by_type'"),
        )
    finally:
        await conn.close()


async def test_migrate_fills_an_added_granularity_exactly_and_fences_old_file_consumers(
    settings: Settings, tmp_path: Path
) -> None:
    plain, coarse = with_rollups(settings, tmp_path, PLAIN), with_rollups(settings, tmp_path, COARSE)
    await migrate_database(plain)
    assert await _registry(plain) == (1, "minute")
    ends = await _populate(plain, 400, seed=5)
    plans = compile_rollups(plain.rollups)
    engine = write_engine(str(plain.postgres_url))
    try:
        old = Flusher(engine, plain.consumer_group, plans, version=await registry_version(engine, plain.rollups))
        more = envelopes([_encode({"type": "click", "ts": RECEIVED - 5, "source": None, "amount": 1,
                                   "country": None, "id": 0}, False)], 1)
        await migrate_database(coarse)  # adds agg_by_type__hour and __day, filled from the 400 events
        assert await _registry(coarse) == (2, "minute,hour,day")
        assert await assert_coarse_exact(coarse) > 0
        # A consumer still running the old file would not write the new tables: it is fenced, and told why.
        batch = prepare({(TOPIC, 0): [Rec(ends, more[0], TOPIC)]}, {(TOPIC, 0): ends}, plans, now_ms=RECEIVED)
        assert await old.flush(batch) is False
        with pytest.raises(StaleRollups, match="does not store by_type hour, by_type day"):
            await registry_version(engine, plain.rollups)
        # The new file's consumer carries on, and keeps every table exact.
        new = Flusher(engine, coarse.consumer_group, compile_rollups(coarse.rollups),
                      version=await registry_version(engine, coarse.rollups))
        batch = prepare({(TOPIC, 0): [Rec(ends, more[0], TOPIC)]}, {(TOPIC, 0): ends},
                        compile_rollups(coarse.rollups), now_ms=RECEIVED)
        assert await new.flush(batch) is True
        assert await assert_coarse_exact(coarse) > 0

        await migrate_database(coarse)  # nothing changed: nothing refilled, the version stays
        assert await _registry(coarse) == (2, "minute,hour,day")
        # Removing a granularity: the table is kept (no longer written), the version moves.
        only_hour = with_rollups(settings, tmp_path, BASE.format(extra='granularities = ["minute", "hour"]'))
        await migrate_database(only_hour)
        assert await _registry(only_hour) == (3, "minute,hour")
        conn = await asyncpg.connect(str(plain.postgres_url))
        try:
            assert await conn.fetchval("SELECT to_regclass('agg_by_type__day') IS NOT NULL")
            await conn.execute("DELETE FROM agg_by_type__day WHERE count > 1")  # drifts while not stored
        finally:
            await conn.close()
        # A consumer still storing day is fenced, and finds day not registered (consumers.runner stops it).
        with pytest.raises(NotRegistered, match="by_type day are not registered"):
            await registry_version(engine, coarse.rollups)
        await migrate_database(coarse)  # back: rebuilt from the base table
        assert await _registry(coarse) == (4, "minute,hour,day")
        assert await assert_coarse_exact(coarse) > 0
    finally:
        await engine.dispose()


async def test_a_consumer_transaction_past_its_fence_during_a_migrate_is_counted_by_the_fill(
    settings: Settings, tmp_path: Path
) -> None:
    """The race the offsets lock closes: an old-file batch that moved its offsets before the migrate
    took its locks commits first (the fill sees its base rows); none is counted twice or missed."""
    plain, coarse = with_rollups(settings, tmp_path, PLAIN), with_rollups(settings, tmp_path, COARSE)
    await migrate_database(plain)
    ends = await _populate(plain, 200, seed=6)
    conn = await asyncpg.connect(str(plain.postgres_url))
    try:
        tx = conn.transaction()
        await tx.start()
        version = await conn.fetchval("SELECT value FROM tally_meta WHERE key = 'rollups_version'")
        moved = await conn.execute(  # consumers.sql.ADVANCE_OFFSET, as a consumer's batch runs it
            "UPDATE tally_offsets SET next_offset = $1 WHERE group_id = $2 AND topic = $3 AND partition = 0 "
            "AND next_offset = $4 AND (SELECT value FROM tally_meta WHERE key = 'rollups_version') = $5",
            ends + 1, plain.consumer_group, TOPIC, ends, version,
        )
        assert moved == "UPDATE 1"
        migrating = asyncio.create_task(migrate_database(coarse))
        await asyncio.sleep(0.5)
        assert not migrating.done()  # waiting for this transaction's offsets lock
        await conn.execute(
            "INSERT INTO agg_by_type (bucket, type, source, count) VALUES (to_timestamp(0), 'late', '', 7)"
        )
        await tx.commit()
        await asyncio.wait_for(migrating, 30)
        assert await conn.fetchval("SELECT count FROM agg_by_type__day WHERE type = 'late'") == 7
    finally:
        await conn.close()
    assert await assert_coarse_exact(coarse) > 0


async def test_a_consumer_transaction_that_reaches_its_fence_during_a_migrate_is_fenced(
    settings: Settings, tmp_path: Path
) -> None:
    """The other order: the migrate holds the offsets lock (paused here behind a writer of the base
    table); a batch moving its offsets waits for it, then reads the new version and is fenced."""
    plain, coarse = with_rollups(settings, tmp_path, PLAIN), with_rollups(settings, tmp_path, COARSE)
    await migrate_database(plain)
    ends = await _populate(plain, 50, seed=7)
    blocker, consumer = await asyncpg.connect(str(plain.postgres_url)), await asyncpg.connect(str(plain.postgres_url))
    try:
        version = await consumer.fetchval("SELECT value FROM tally_meta WHERE key = 'rollups_version'")
        held = blocker.transaction()
        await held.start()
        await blocker.execute(
            "INSERT INTO agg_by_type (bucket, type, source, count) VALUES (to_timestamp(0), 'b', '', 2)"
        )
        migrating = asyncio.create_task(migrate_database(coarse))
        await asyncio.sleep(0.5)  # the migrate now holds tally_offsets and waits for agg_by_type
        advancing = asyncio.create_task(
            consumer.execute(
                "UPDATE tally_offsets SET next_offset = $1 WHERE group_id = $2 AND topic = $3 AND partition = 0 "
                "AND next_offset = $4 AND (SELECT value FROM tally_meta WHERE key = 'rollups_version') = $5",
                ends + 1, plain.consumer_group, TOPIC, ends, version,
            )
        )
        await asyncio.sleep(0.3)
        assert not migrating.done() and not advancing.done()
        await held.commit()
        await asyncio.wait_for(migrating, 30)
        assert await asyncio.wait_for(advancing, 30) == "UPDATE 0"  # fenced by the version it waited for
    finally:
        await blocker.close()
        await consumer.close()
    assert await assert_coarse_exact(coarse) > 0


async def test_backfill_writes_the_coarse_tables(settings: Settings, tmp_path: Path) -> None:
    """`tally backfill` applies events through the consumer's flush, so a new rollup's coarse tables
    are filled with its base table (the backfill itself is tested in test_backfill.py)."""
    from consumers.backfill import backfill
    from tests.integration.consumer_helpers import make_events, produce, spread

    s = with_rollups(settings, tmp_path, COARSE)
    encoded = make_events(300, random.Random(8))
    ends = await produce(s, spread(envelopes(encoded, 7), s.topic_partitions))
    await migrate(s)
    # The live consumers' starts: the end of the topic (they applied nothing of the past).
    conn = await asyncpg.connect(str(s.postgres_url))
    try:
        await conn.executemany(
            "INSERT INTO tally_rollup_starts (group_id, rollup, topic, partition, start_offset) "
            "VALUES ($1, $2, $3, $4, $5)",
            [(s.consumer_group, "by_type", s.topic, p, ends.get(p, 0)) for p in range(s.topic_partitions)],
        )
    finally:
        await conn.close()
    report = await backfill(s, "by_type", None, wait=5)
    assert report.events == 300
    conn = await asyncpg.connect(str(s.postgres_url))
    try:
        for table in ("agg_by_type", "agg_by_type__hour", "agg_by_type__day"):
            assert await conn.fetchval(f"SELECT sum(count) FROM {table}") == 300
    finally:
        await conn.close()
    spec = next(x for x in s.rollups if x.name == "by_type")
    assert await assert_coarse_exact(s, [spec]) > 0


async def test_retention_expires_each_coarse_table_at_its_own_granularity(settings: Settings, tmp_path: Path) -> None:
    body = COARSE.replace('granularities = ["minute", "hour", "day"]', 'granularities = ["minute", "hour", "day"]\n'
                          'retention = "2d"')
    s = with_rollups(settings, tmp_path, body, retention_batch_rows=50, retention_pause_seconds=0.0)
    await migrate_database(s)
    now = datetime(2026, 11, 25, 12, 0, 30, tzinfo=UTC)
    # 2d + 1 h grace before now: 2026-11-23 11:00:30, floored per table.
    cuts = {"minute": datetime(2026, 11, 23, 11, tzinfo=UTC), "hour": datetime(2026, 11, 23, 11, tzinfo=UTC),
            "day": datetime(2026, 11, 23, tzinfo=UTC)}
    minutes = [datetime(2026, 11, 22, 9, tzinfo=UTC) + i * timedelta(minutes=7) for i in range(600)]
    conn = await asyncpg.connect(str(s.postgres_url))
    try:
        await conn.copy_records_to_table("agg_by_type", records=[(b, t, "", 1) for b in minutes for t in "ab"],
                                         columns=["bucket", "type", "source", "count"])
        spec = next(x for x in s.rollups if x.name == "by_type")
        await fill_coarse_tables_at(str(s.postgres_url), [spec])
        await assert_coarse_exact(s, [spec])
        before = {g: {tuple(r) for r in await conn.fetch(f"SELECT bucket, type FROM {spec.table_for(g)}")}
                  for g in spec.granularities}

        dry = await run_retention(s, now=now, dry_run=True)
        assert [(r.table, r.cutoff) for r in dry.rollups] == [(spec.table_for(g), cuts[g]) for g in cuts]
        report = await run_retention(s, now=now)
        assert [(r.table, r.cutoff, r.deleted) for r in report.rollups] == [
            (spec.table_for(g), cuts[g], sum(1 for b, _ in before[g] if b < cuts[g])) for g in cuts
        ]
        for g in cuts:
            after = {tuple(r) for r in await conn.fetch(f"SELECT bucket, type FROM {spec.table_for(g)}")}
            assert after == {k for k in before[g] if k[0] >= cuts[g]}
        assert "by_type (agg_by_type__day): keeps 2d; deleted" in format_report(report)
    finally:
        await conn.close()


async def test_a_registry_older_than_coarse_tables_is_upgraded_in_place(settings: Settings, tmp_path: Path) -> None:
    """A database migrated before `granularities` existed: its rows store the base alone (NULL)."""
    plain, coarse = with_rollups(settings, tmp_path, PLAIN), with_rollups(settings, tmp_path, COARSE)
    await migrate_database(plain)
    await _populate(plain, 100, seed=9)
    conn = await asyncpg.connect(str(plain.postgres_url))
    try:
        await conn.execute("ALTER TABLE tally_rollups DROP COLUMN granularities")
        engine = write_engine(str(plain.postgres_url))
        try:
            with pytest.raises(Exception, match="granularities"):  # new consumers need the new migrate first
                await registry_version(engine, plain.rollups)
        finally:
            await engine.dispose()
        # Adds the column. by_type is unchanged (NULL: minute alone); pages' day table, which the old
        # registry cannot have known, is registered again (rebuilt from its base): the version moves.
        await migrate_database(plain)
        assert await _registry(plain) == (2, None)
        await migrate_database(coarse)
        assert await _registry(coarse) == (3, "minute,hour,day")
        assert await conn.fetchval("SELECT granularities FROM tally_rollups WHERE name = 'pages'") == "hour,day"
    finally:
        await conn.close()
    assert await assert_coarse_exact(coarse) > 0
