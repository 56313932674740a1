"""Retention on real Postgres: exact cut-off, batches in their own transactions, no long waits for
the consumer's upserts or the query API while 200k rows go, one runner at a time, idempotent re-runs,
and late events that do not bring deleted buckets back."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from prometheus_client import REGISTRY

from consumers.aggregate import compile_rollup
from consumers.sql import upsert
from core.db import write_engine
from core.migrate import migrate, migrate_database
from core.retention import LOCK_ID, Batch, RetentionReport, run_retention
from core.settings import Settings
from query.app import create_app
from query.catalog import describe
from schemas.events import normalize_event
from schemas.rollups import RollupSpecError, fingerprint, format_retention, parse_retention, parse_rollup
from tests.conftest import serve
from tests.integration.consumer_helpers import consumer_settings, envelopes, produce, running, wait_for_offsets

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 25, 12, 0, 30, tzinfo=UTC)  # the runs' clock, passed in: cut-offs are exact
MINUTE, HOUR, DAY = timedelta(minutes=1), timedelta(hours=1), timedelta(days=1)
ROLLUPS = """
[[rollup]]
name = "by_type"
dimensions = ["type"]
measures = ["count"]
retention = "2d"

[[rollup]]
name = "daily"
granularity = "day"
dimensions = ["type"]
measures = ["count"]
retention = "3d"

[[rollup]]
name = "forever"
dimensions = ["type"]
measures = ["count"]
"""


def with_rollups(settings: Settings, tmp_path: Path, body: str = ROLLUPS, **overrides: Any) -> Settings:
    """Fresh settings reading `body` (model_copy would keep an already loaded rollups file)."""
    path = tmp_path / "rollups.toml"
    path.write_text(body)
    return Settings(**{**settings.model_dump(), "rollups_file": path, **overrides})


async def connect(settings: Settings) -> asyncpg.Connection:
    return await asyncpg.connect(str(settings.postgres_url))


async def keys(conn: asyncpg.Connection, table: str) -> set[tuple[datetime, str]]:
    return {(r["bucket"], r["type"]) for r in await conn.fetch(f"SELECT bucket, type FROM {table}")}


async def fill(conn: asyncpg.Connection, table: str, buckets: Sequence[datetime], types: Sequence[str]) -> None:
    rows = [(b, t, 1) for b in buckets for t in types]
    await conn.copy_records_to_table(table, records=rows, columns=["bucket", "type", "count"])


def test_retention_is_declared_per_rollup_and_is_not_part_of_the_definition() -> None:
    base = {"name": "r", "granularity": "hour", "dimensions": ["type"], "measures": ["count"]}
    kept = parse_rollup({**base, "retention": "90d"})
    assert kept.retention == timedelta(days=90)
    assert parse_rollup({**base, "retention": "36h"}).retention == timedelta(hours=36)
    assert parse_rollup(base).retention is None
    # Changing how long rows are kept does not change what they hold: no migration, no fencing.
    assert fingerprint(kept) == fingerprint(parse_rollup(base))
    assert [format_retention(parse_retention(v, "r", "minute")) for v in ("90d", "36h", "48h", "1h")] == [
        "90d", "36h", "2d", "1h",
    ]
    for bad in ("90", "1m", "0d", "2w", "-1d", 90, "1.5d", " 9d"):
        with pytest.raises(RollupSpecError, match="retention"):
            parse_rollup({**base, "retention": bad})
    with pytest.raises(RollupSpecError, match="shorter than one day bucket"):
        parse_rollup({**base, "granularity": "day", "retention": "12h"})
    assert describe(kept).retention == "90d"
    assert describe(parse_rollup(base)).retention is None


async def test_old_buckets_go_recent_ones_stay_in_batches_and_a_rerun_changes_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    s = with_rollups(settings, tmp_path, retention_batch_rows=100, retention_pause_seconds=0.0)
    await migrate_database(s)
    # by_type keeps 2d (+1 h grace): the cut-off is (12:00:30 - 2d - 1h) floored to the minute.
    minutes = [datetime(2026, 11, 23, 9, tzinfo=UTC) + i * MINUTE for i in range(240)]  # 09:00 .. 12:59
    days = [datetime(2026, 11, 15, tzinfo=UTC) + i * DAY for i in range(11)]  # 15th .. 25th
    conn = await connect(s)
    try:
        await fill(conn, "agg_by_type", minutes, ["a", "b", "c"])
        await fill(conn, "agg_daily", days, ["a", "b"])
        await fill(conn, "agg_forever", minutes[:50], ["a"])
        before = {t: await keys(conn, t) for t in ("agg_by_type", "agg_daily", "agg_forever")}

        dry = await run_retention(s, now=NOW, dry_run=True)
        assert [(r.rollup, r.cutoff, r.deleted, r.batches) for r in dry.rollups] == [
            ("by_type", datetime(2026, 11, 23, 11, tzinfo=UTC), 360, []),
            ("daily", datetime(2026, 11, 22, tzinfo=UTC), 14, []),
        ]
        assert {t: await keys(conn, t) for t in before} == before  # a dry run deletes nothing

        report = await run_retention(s, now=NOW)
        assert report.ran
        by_type, daily = report.rollups
        assert (by_type.rollup, by_type.retention, by_type.deleted) == ("by_type", "2d", 360)
        assert [b.rows for b in by_type.batches] == [100, 100, 100, 60]  # 360 rows in batches of 100
        xids = [b.xid for b in by_type.batches]
        assert None not in xids and len(set(xids)) == 4  # four transactions, one per batch
        assert (daily.deleted, [b.rows for b in daily.batches]) == (14, [14])
        cut = datetime(2026, 11, 23, 11, tzinfo=UTC)
        assert await keys(conn, "agg_by_type") == {k for k in before["agg_by_type"] if k[0] >= cut}
        assert len(await keys(conn, "agg_by_type")) == 360
        day_cut = datetime(2026, 11, 22, tzinfo=UTC)
        assert await keys(conn, "agg_daily") == {k for k in before["agg_daily"] if k[0] >= day_cut}
        assert await keys(conn, "agg_forever") == before["agg_forever"]  # no retention: kept forever

        after = {t: await keys(conn, t) for t in before}
        again = await run_retention(s, now=NOW)
        assert [(r.deleted, r.batches) for r in again.rollups] == [(0, [Batch(0, None)]), (0, [Batch(0, None)])]
        assert {t: await keys(conn, t) for t in before} == after

        # The command an operator schedules, on the real clock: by then every by_type row is past 2d.
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "core.cli", "retention", env=s.process_env(),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
        assert proc.returncode == 0, out
        assert "by_type: keeps 2d; deleted 360 rows with buckets before" in out, out
        assert await keys(conn, "agg_by_type") == set()
    finally:
        await conn.close()


async def test_200k_old_rows_go_in_short_transactions_while_upserts_and_queries_carry_on(
    settings: Settings, tmp_path: Path
) -> None:
    s = with_rollups(settings, tmp_path, retention_batch_rows=5_000, retention_pause_seconds=0.02)
    await migrate_database(s)
    cut = datetime(2026, 11, 23, 11, tzinfo=UTC)
    old = [cut - (i + 1) * MINUTE for i in range(20_000)]  # 20,000 minutes x 10 types = 200,000 rows
    recent = [cut + i * MINUTE for i in range(100)]
    conn = await connect(s)
    try:
        await fill(conn, "agg_by_type", old, [f"t{k}" for k in range(10)])
        await fill(conn, "agg_by_type", recent, ["t0"])
        await conn.execute("ANALYZE agg_by_type")
        assert await conn.fetchval("SELECT count(*) FROM agg_by_type WHERE bucket < $1", cut) == 200_000

        plan = compile_rollup(next(r for r in s.rollups if r.name == "by_type"))
        up = upsert(plan)
        engine = write_engine(str(s.postgres_url), pool_size=1, app="test-writer")
        rng = random.Random(8)
        done = asyncio.Event()
        waits: dict[str, list[float]] = {"upsert": [], "query": []}
        seen_old: list[int] = []
        writes = 0

        async def writer() -> None:
            """The consumer's own upsert statement: +1 on a recent row, and +1 on an old row (a writer that
            does not filter, like a backfill without retention, racing the deletes row for row)."""
            nonlocal writes
            while not done.is_set():
                cells = {(recent[writes % 100], "t0"): [1], (old[rng.randrange(20_000)], f"t{rng.randrange(10)}"): [1]}
                started = time.perf_counter()
                async with engine.begin() as c:
                    await c.execute(up.statement, up.params(cells))
                waits["upsert"].append(time.perf_counter() - started)
                writes += 1
                await asyncio.sleep(0.005)

        async def reader(http: httpx.AsyncClient) -> None:
            params = {"from": cut.isoformat(), "to": (cut + 2 * HOUR).isoformat(), "granularity": "hour",
                      "fields": "type,count"}
            while not done.is_set():
                floor = writes
                started = time.perf_counter()
                response = await http.get("/v1/rollups/by_type", params=params, headers={"Cache-Control": "no-cache"})
                waits["query"].append(time.perf_counter() - started)
                assert response.status_code == 200, response.text
                (row,) = response.json()["data"]
                assert 100 + floor <= row["count"] <= 100 + writes  # every recent row, and every write committed
                await asyncio.sleep(0.01)

        async def observer(watcher: asyncpg.Connection) -> None:
            while not done.is_set():
                seen_old.append(await watcher.fetchval("SELECT count(*) FROM agg_by_type WHERE bucket < $1", cut))
                await asyncio.sleep(0.05)

        watcher = await connect(s)
        async with serve(create_app(s)) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
            listed = {r["name"]: r["retention"] for r in (await http.get("/v1/rollups")).json()["data"]}
            assert listed == {"by_type": "2d", "daily": "3d", "forever": None}
            tasks = [asyncio.create_task(f) for f in (writer(), reader(http), observer(watcher))]
            await asyncio.sleep(0.3)  # the load runs before, during and after
            try:
                report = await run_retention(s, now=NOW)
                await asyncio.sleep(0.3)
            finally:
                done.set()
                await asyncio.gather(*tasks)
        await watcher.close()
        await engine.dispose()

        by_type = report.rollups[0]
        rows = [b.rows for b in by_type.batches]
        # The old rows the writer brought back after their batch passed are left to the next run.
        # (A row the writer held was skipped, not waited for; both are left to the next run.)
        assert 200_000 - writes <= by_type.deleted <= 200_000 + writes and sum(rows) == by_type.deleted
        # A row the writer updated during a batch is locked but not deleted: a batch may be short by it.
        assert len(rows) >= 40 and all(5_000 - writes <= r <= 5_000 for r in rows[:-1]) and rows[-1] < 5_000
        assert len({b.xid for b in by_type.batches if b.rows}) == len([r for r in rows if r])  # one transaction each
        # Others saw the deletes land batch by batch, not all at once at the end.
        assert len({n for n in seen_old if 0 < n < 200_000}) >= 3, seen_old
        assert writes >= 20 and len(waits["query"]) >= 10
        assert max(waits["upsert"]) < 1.0, sorted(waits["upsert"])[-5:]
        assert max(waits["query"]) < 1.0, sorted(waits["query"])[-5:]
        print(
            f"\nretention of {by_type.deleted} rows in {len(rows)} batches took {report.seconds:.2f} s; "
            f"upserts: {writes}, max {max(waits['upsert']) * 1000:.0f} ms; "
            f"queries: {len(waits['query'])}, max {max(waits['query']) * 1000:.0f} ms"
        )

        left = await conn.fetchval("SELECT count(*) FROM agg_by_type WHERE bucket < $1", cut)
        second = await run_retention(s, now=NOW)
        assert second.rollups[0].deleted == left
        assert await conn.fetchval("SELECT count(*) FROM agg_by_type WHERE bucket < $1", cut) == 0
        counts = await conn.fetch("SELECT bucket, count FROM agg_by_type ORDER BY bucket")
        assert [r["bucket"] for r in counts] == recent  # every recent row kept ...
        assert sum(r["count"] for r in counts) == 100 + writes  # ... with every upsert in it, exactly
    finally:
        await conn.close()


async def advisory_lock_held(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = $1 AND granted",
            LOCK_ID,
        )
    )


async def test_two_runners_at_once_one_deletes_the_other_skips(settings: Settings, tmp_path: Path) -> None:
    s = with_rollups(settings, tmp_path, retention_batch_rows=1_000, retention_pause_seconds=0.05)
    await migrate_database(s)
    cut = datetime(2026, 11, 23, 11, tzinfo=UTC)
    conn = await connect(s)
    try:
        await fill(conn, "agg_by_type", [cut - (i + 1) * MINUTE for i in range(2_000)], [f"t{k}" for k in range(10)])
        first = asyncio.create_task(run_retention(s, now=NOW))
        deadline = time.monotonic() + 20
        while not await advisory_lock_held(conn):
            assert not first.done() and time.monotonic() < deadline, "the first runner never took the lock"
            await asyncio.sleep(0.01)
        second = await run_retention(s, now=NOW)  # while the first one deletes
        assert (second.ran, second.rollups) == (False, [])
        assert not first.done()
        report: RetentionReport = await first
        assert report.ran and report.rollups[0].deleted == 20_000
        assert [b.rows for b in report.rollups[0].batches] == [1_000] * 20 + [0]
        assert not await advisory_lock_held(conn)  # released when done
        assert await conn.fetchval("SELECT count(*) FROM agg_by_type") == 0
        third = await run_retention(s, now=NOW)  # the lock is free again; nothing is left to delete
        assert third.ran and [r.deleted for r in third.rollups] == [0, 0]
    finally:
        await conn.close()


def expired_total(rollup: str) -> float:
    value = REGISTRY.get_sample_value("tally_consumer_expired_events_total", {"rollup": rollup})
    return value or 0.0


async def test_a_consumer_skips_events_past_retention_and_runs_retention_itself(
    settings: Settings, tmp_path: Path
) -> None:
    # daily keeps 4d: the 3-day-late events stay inside it whatever the time of day.
    body = ROLLUPS.replace('retention = "3d"', 'retention = "4d"\nwhere = { type = "keep" }')
    s = with_rollups(settings, tmp_path, body, retention_interval_seconds=0.5, retention_grace_seconds=0)
    await migrate(s)
    now = int(time.time() * 1000)
    conn = await connect(s)
    try:
        ancient = datetime.fromtimestamp((now - 5 * 86_400_000) // 60_000 * 60, UTC)
        await fill(conn, "agg_by_type", [ancient], ["stale"])  # past retention: the consumer's run deletes it
        rng = random.Random(4)
        raw: list[dict[str, Any]] = [
            {"type": rng.choice(["a", "b", "keep"]), "ts": now - age - rng.randrange(600_000)}
            for age in [3_600_000] * 60 + [3 * 86_400_000] * 40  # an hour late, and 3 days late
        ]
        encoded = [normalize_event(e, now, s.event_limits) for e in raw]
        events = [orjson.loads(e) for e in encoded]
        before = expired_total("by_type"), expired_total("daily"), expired_total("forever")
        ends = await produce(s, [(i % 4, v) for i, v in enumerate(envelopes(encoded, 7))])
        consumer = consumer_settings(s)
        async with running(consumer) as (_, task):
            await wait_for_offsets(consumer, ends, [task])
            deadline = time.monotonic() + 20
            while await conn.fetchval("SELECT count(*) FROM agg_by_type WHERE type = 'stale'"):
                assert time.monotonic() < deadline, "the consumer's periodic retention never ran"
                await asyncio.sleep(0.05)

        def expect(kept: list[dict[str, Any]], width_ms: int) -> dict[tuple[datetime, str], int]:
            out: dict[tuple[datetime, str], int] = {}
            for e in kept:
                key = (datetime.fromtimestamp(e["ts"] // width_ms * width_ms / 1000, UTC), e["type"])
                out[key] = out.get(key, 0) + 1
            return out

        async def table(name: str) -> dict[tuple[datetime, str], int]:
            return {(r["bucket"], r["type"]): r["count"] for r in await conn.fetch(f"SELECT * FROM {name}")}

        recent = [e for e in events if e["ts"] > now - 2 * 86_400_000]
        assert len(recent) == 60
        assert await table("agg_by_type") == expect(recent, 60_000)  # 3-day-late events not counted (2d)
        assert await table("agg_daily") == expect([e for e in events if e["type"] == "keep"], 86_400_000)
        assert await table("agg_forever") == expect(events, 60_000)  # no retention: every event counts
        after = expired_total("by_type"), expired_total("daily"), expired_total("forever")
        assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (40, 0, 0)
    finally:
        await conn.close()
