"""Sketch measures (issue 19) through the consumer's real prepare + flush into real Postgres, and
back out through the query API.

The write property: random events split into random batches (unnest and COPY paths, with and
without de-duplication, retried batches included) leave, in every table of the rollup, each
row's HLL with exactly the estimate of one sketch of the row's counted values, and each row's
KLL (fewer values than k, so nothing is compacted) with exactly the row's counted values.
The read side: re-bucketing, omitted dimensions, filters, order by a sketch field, cursors and
the three formats give the union's estimate of the matching rows, checked against sketches
built here from the events.
"""

from __future__ import annotations

import bisect
import csv
import io
import random
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import datasketches as ds
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers import flush
from consumers.aggregate import compile_rollups
from consumers.batch import prepare
from consumers.dedup_store import Dedup
from consumers.flush import Flusher
from consumers.registry import registry_version
from core.db import write_engine
from core.migrate import migrate_database
from core.settings import Settings
from schemas import sketches
from schemas.events import EventLimits, normalize_event
from schemas.rollups import dimension_text
from tests.integration.coarse_support import reset_tables, with_rollups
from tests.integration.consumer_helpers import envelopes
from tests.integration.query_support import exact, query_api, walk
from tests.records import Rec

pytestmark = pytest.mark.integration

ROLLUPS = """
[[rollup]]
name = "sk"
granularities = ["minute", "hour", "day"]
dimensions = ["type", "source"]
measures = ["count", "sum:properties.amount", "uniq:user_id", "quantiles:properties.amount",
            { uniq = "properties.path", lg_k = 12 }]
"""
RECEIVED = 1_796_000_000_000
SPAN = 50 * 3_600_000
TOPIC = "events"

_EVENT = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["click", "view"]),
        "ts": st.integers(RECEIVED - SPAN, RECEIVED),
        "source": st.sampled_from([None, "web", "ios"]),
        "user": st.one_of(st.none(), st.integers(0, 60).map(lambda i: f"u{i}")),
        "amount": st.one_of(st.none(), st.integers(-50, 50), st.floats(-1e3, 1e3, allow_nan=False), st.just("x")),
        "path": st.one_of(st.none(), st.sampled_from(["/", "/a", 7, True, [1]])),
        "id": st.integers(0, 30),
    }
)


def _encode(e: dict[str, Any], with_id: bool) -> bytes:
    raw: dict[str, Any] = {"type": e["type"], "ts": e["ts"]}
    if e["source"] is not None:
        raw["source"] = e["source"]
    if e["user"] is not None:
        raw["user_id"] = e["user"]
    props = {k: e[k] for k in ("amount", "path") if e[k] is not None}
    if props:
        raw["properties"] = props
    if with_id:
        raw["event_id"] = f"00000000-0000-4000-8000-{e['id']:012d}"
    return normalize_event(raw, RECEIVED, EventLimits())


def _floor(ts: int, granularity: str) -> datetime:
    width = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000}[granularity]
    return datetime.fromtimestamp((ts - ts % width) / 1000, UTC)


def _expected(events: list[dict[str, Any]], granularity: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Per row of a `granularity` table: one HLL per uniq measure and one KLL of all its values, built here."""
    rows: dict[tuple[Any, ...], dict[str, Any]] = defaultdict(
        lambda: {
            "users": ds.hll_sketch(15, ds.tgt_hll_type.HLL_8),
            "paths": ds.hll_sketch(12, ds.tgt_hll_type.HLL_8),
            "amounts": [],
            "count": 0,
        }
    )
    for e in events:
        row = rows[(_floor(e["ts"], granularity), e["type"], e["source"] or "")]
        row["count"] += 1
        if e["user"] is not None:
            row["users"].update(e["user"])
        if e["path"] is not None:
            row["paths"].update(dimension_text(e["path"]))
        if type(e["amount"]) in (int, float):
            row["amounts"].append(float(e["amount"]))
    return rows


@pytest.fixture
async def sketched(settings: Settings, tmp_path: Path) -> Settings:
    s = with_rollups(settings, tmp_path, ROLLUPS)
    await migrate_database(s)
    return s


async def _apply(
    s: Settings, encoded: list[bytes], cuts: list[int], *, per_record: int, dedup: bool, replay: bool = False
) -> None:
    """The records through prepare + flush in batches of `cuts` records; `replay`: every batch is
    flushed twice, the second time fenced (a retry after a lost acknowledgement)."""
    plans = compile_rollups(s.rollups)
    records = envelopes(encoded, per_record)
    engine = write_engine(str(s.postgres_url))
    dedupe = Dedup(engine, 24) if dedup else None
    try:
        flusher = Flusher(
            engine, s.consumer_group, plans, version=await registry_version(engine, s.rollups), dedup=dedupe
        )
        offset, i = 0, 0
        while offset < len(records):
            n = cuts[i % len(cuts)]
            i += 1
            polled = {(TOPIC, 0): [Rec(o, records[o], TOPIC) for o in range(offset, min(offset + n, len(records)))]}
            batch = prepare(polled, {(TOPIC, 0): offset}, plans, dedup=dedup, now_ms=RECEIVED)
            assert await flusher.flush(batch) is True
            if replay:
                again = prepare(polled, {(TOPIC, 0): offset}, plans, dedup=dedup, now_ms=RECEIVED)
                assert await flusher.flush(again) is False
            offset = batch.advances[0].new
    finally:
        if dedupe is not None:
            await dedupe.close()
        await engine.dispose()


async def _assert_tables_hold(s: Settings, counted: list[dict[str, Any]]) -> int:
    conn = await asyncpg.connect(str(s.postgres_url))
    checked = 0
    try:
        spec = s.rollups[0]
        for g in spec.granularities:
            want = _expected(counted, g)
            got = await conn.fetch(
                f"SELECT bucket, type, source, count, uniq_user_id, quantiles_properties_amount, "
                f'uniq_properties_path FROM "{spec.table_for(g)}"'
            )
            assert {(r["bucket"], r["type"], r["source"]) for r in got} == set(want), g
            for r in got:
                w = want[(r["bucket"], r["type"], r["source"])]
                assert r["count"] == w["count"]
                for column, sketch in (("uniq_user_id", w["users"]), ("uniq_properties_path", w["paths"])):
                    if sketch.is_empty():
                        assert r[column] is None
                    else:
                        # One sketch of every counted value, stored as Tally stores it (sketches.encode).
                        stored = sketches.decode_uniq(sketches.encode(sketch))
                        assert sketches.decode_uniq(r[column]).get_estimate() == stored.get_estimate(), column
                if not w["amounts"]:
                    assert r["quantiles_properties_amount"] is None
                else:
                    kll = ds.kll_doubles_sketch.deserialize(r["quantiles_properties_amount"])
                    assert kll.n == len(w["amounts"]) and not kll.is_estimation_mode()
                    ranks = [i / 20 for i in range(21)]
                    ref = ds.kll_doubles_sketch(400)
                    for a in w["amounts"]:
                        ref.update(a)
                    assert kll.get_quantiles(ranks) == ref.get_quantiles(ranks)
                checked += 1
    finally:
        await conn.close()
    return checked


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    events=st.lists(_EVENT, min_size=1, max_size=150),
    cuts=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    per_record=st.integers(1, 9),
    copy_from=st.sampled_from([1, 4, flush.COPY_MIN_ROWS]),
    dedup=st.booleans(),
    replay=st.booleans(),
)
async def test_every_tables_sketches_equal_one_sketch_of_the_counted_events(
    sketched: Settings,
    events: list[dict[str, Any]],
    cuts: list[int],
    per_record: int,
    copy_from: int,
    dedup: bool,
    replay: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flush, "COPY_MIN_ROWS", copy_from)
    conn = await asyncpg.connect(str(sketched.postgres_url))
    try:
        await reset_tables(conn, TOPIC, sketched)
    finally:
        await conn.close()
    await _apply(sketched, [_encode(e, dedup) for e in events], cuts, per_record=per_record, dedup=dedup, replay=replay)
    counted = events
    if dedup:  # of the events sharing an id, the first in the topic counts
        first: dict[int, dict[str, Any]] = {}
        for e in events:
            first.setdefault(e["id"], e)
        counted = list(first.values())
    assert await _assert_tables_hold(sketched, counted) > 0


async def _seed(s: Settings, n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events = [
        {
            "type": rng.choice(["click", "view"]),
            "ts": RECEIVED - rng.randrange(SPAN),
            "source": rng.choice([None, "web", "ios"]),
            "user": f"u{rng.randrange(400)}",
            "amount": rng.choice([None, rng.randrange(1000), rng.random() * 100]),
            "path": rng.choice(["/", "/a"]),
            "id": 0,
        }
        for _ in range(n)
    ]
    conn = await asyncpg.connect(str(s.postgres_url))
    try:
        await reset_tables(conn, TOPIC, s)
    finally:
        await conn.close()
    await _apply(s, [_encode(e, False) for e in events], [7, 3, 50], per_record=40, dedup=False)
    return events


def _reference(events: list[dict[str, Any]]) -> tuple[int, ds.kll_doubles_sketch]:
    users = {e["user"] for e in events}
    kll = ds.kll_doubles_sketch(400)
    for e in events:
        if type(e["amount"]) in (int, float):
            kll.update(float(e["amount"]))
    return len(users), kll


async def test_queries_unite_the_matching_rows_sketches_at_every_granularity_and_shape(sketched: Settings) -> None:
    events = await _seed(sketched, 3000, 7)
    spec = sketched.rollups[0]
    assert spec.measure_fields == (
        "count",
        "sum_properties_amount",
        "uniq_user_id",
        "p50_properties_amount",
        "p95_properties_amount",
        "p99_properties_amount",
        "uniq_properties_path",
    )
    assert spec.offered_fields == (*spec.measure_fields, "avg_properties_amount")
    window = {"from": "2026-11-27T00:00:00Z", "to": "2026-12-01T00:00:00Z"}
    async with query_api(sketched) as http:
        # Totals over every dimension: the union of every stored row's sketch (fewer than 1,000 users: exact).
        body = exact(
            await http.get(
                "/v1/rollups/sk",
                params={
                    **window,
                    "granularity": "day",
                    "fields": "uniq_user_id,p50_properties_amount,p999_properties_amount,count",
                },
            )
        )
        uniq, kll = _reference(events)
        totals = body["data"]
        assert sum(r["count"] for r in totals) == len(events)
        # Totals without bucket: one row.
        whole = exact(
            await http.get(
                "/v1/rollups/sk",
                params={
                    **window,
                    "granularity": "day",
                    "fields": "uniq_user_id,p50_properties_amount,p999_properties_amount",
                },
            )
        )
        (row,) = whole["data"]
        assert row["uniq_user_id"] == uniq
        amounts = sorted(float(e["amount"]) for e in events if type(e["amount"]) in (int, float))
        for field, rank in (("p50_properties_amount", 0.5), ("p999_properties_amount", 0.999)):
            # Within twice KLL's rank error at 99 % (tests/unit/test_sketch_accuracy.py holds the bound itself).
            at = bisect.bisect_left(amounts, row[field]) / len(amounts)
            assert abs(at - rank) <= 2 * kll.normalized_rank_error(False) + 1 / len(amounts), (field, at)
        # Months from the day table (re-bucketed at query time): each month's union.
        months = exact(
            await http.get(
                "/v1/rollups/sk",
                params={
                    "from": "2026-10-01T00:00:00Z",
                    "to": "2027-01-01T00:00:00Z",
                    "granularity": "month",
                    "fields": "bucket,uniq_user_id,count",
                },
            )
        )
        assert months["meta"]["table_granularity"] == "day"
        per_month: dict[str, set[str]] = defaultdict(set)
        for e in events:
            per_month[_floor(e["ts"], "day").strftime("%Y-%m-01T00:00:00Z")].add(e["user"])
        assert {r["bucket"]: r["uniq_user_id"] for r in months["data"]} == {m: len(u) for m, u in per_month.items()}
        # Per type, filtered to web, ordered by the sketch field descending: exact distinct counts.
        by_type = exact(
            await http.get(
                "/v1/rollups/sk",
                params={
                    **window,
                    "granularity": "hour",
                    "fields": "type,uniq_user_id,avg_properties_amount",
                    "filter[source]": "web",
                    "order": "-uniq_user_id",
                },
            )
        )
        want = {
            t: len({e["user"] for e in events if e["type"] == t and e["source"] == "web"}) for t in ("click", "view")
        }
        assert [(r["type"], r["uniq_user_id"]) for r in by_type["data"]] == sorted(
            want.items(), key=lambda kv: (-kv[1], kv[0])
        )
        for r in by_type["data"]:
            amounts = [
                e["amount"]
                for e in events
                if e["type"] == r["type"] and e["source"] == "web" and type(e["amount"]) in (int, float)
            ]
            n = sum(1 for e in events if e["type"] == r["type"] and e["source"] == "web")
            assert float(r["avg_properties_amount"]) == pytest.approx(sum(amounts) / n)
        # A cursor walk ordered by a sketch field, bounded by one, visits every group once, in order.
        params = {
            **window,
            "granularity": "hour",
            "fields": "bucket,type,uniq_user_id,p95_properties_amount",
            "order": "-uniq_user_id",
            "filter[uniq_user_id]": "gte:2",
            "limit": "7",
        }
        rows, pages = await walk(http, "/v1/rollups/sk", params)
        assert pages > 1
        per_hour: dict[tuple[str, str], set[str]] = defaultdict(set)
        for e in events:
            per_hour[(_floor(e["ts"], "hour").strftime("%Y-%m-%dT%H:%M:%SZ"), e["type"])].add(e["user"])
        want_rows = {k: len(v) for k, v in per_hour.items() if len(v) >= 2}
        assert {(r["bucket"], r["type"]): r["uniq_user_id"] for r in rows} == want_rows
        assert [r["uniq_user_id"] for r in rows] == sorted((r["uniq_user_id"] for r in rows), reverse=True)
        assert len(rows) == len(want_rows)
        total = exact(await http.get("/v1/rollups/sk", params={**params, "total": "true"}))
        assert total["meta"]["total"] == len(want_rows)
        # The same query as columns and as CSV.
        cols = exact(await http.get("/v1/rollups/sk", params={**params, "format": "columns", "limit": "1000"}))
        assert (
            dict(
                zip(
                    zip(cols["data"]["bucket"], cols["data"]["type"], strict=True),
                    cols["data"]["uniq_user_id"],
                    strict=True,
                )
            )
            == want_rows
        )
        text = (await http.get("/v1/rollups/sk", params={**params, "format": "csv", "limit": "1000"})).text
        parsed = list(csv.DictReader(io.StringIO(text)))
        assert {(r["bucket"], r["type"]): int(r["uniq_user_id"]) for r in parsed} == want_rows
        # An export (more rows than a page) ranked by a sketch field: streamed after ranking, counted first.
        export = await http.get(
            "/v1/rollups/sk", params={**params, "format": "csv", "limit": "100000", "total": "true"}
        )
        assert export.headers["x-cache"] == "stream" and export.headers["x-total-count"] == str(len(want_rows))
        exported = list(csv.DictReader(io.StringIO(export.text)))
        assert [int(r["uniq_user_id"]) for r in exported] == [r["uniq_user_id"] for r in rows]  # the walk's order
        assert {(r["bucket"], r["type"]): int(r["uniq_user_id"]) for r in exported} == want_rows
        # An unknown percentile is a 400 that names it.
        bad = await http.get("/v1/rollups/sk", params={"fields": "p100_properties_amount"})
        assert bad.status_code == 400 and "p100_properties_amount" in bad.text


async def test_a_rollup_of_sketches_alone_merges_existing_rows(settings: Settings, tmp_path: Path) -> None:
    """No count, sum, min or max to merge: the upsert's conflict clause changes nothing but still locks
    and returns each existing row, whose sketches the flush unites. Two batches over the same rows."""
    declared = '[[rollup]]\nname = "only"\ndimensions = ["type"]\nmeasures = ["uniq:user_id"]\n'
    s = with_rollups(settings, tmp_path, declared)
    await migrate_database(s)
    events = [
        {"type": "click", "ts": RECEIVED - 1000 * (i % 50), "source": None, "user": f"u{i}",
         "amount": None, "path": None, "id": 0}
        for i in range(300)
    ]
    conn = await asyncpg.connect(str(s.postgres_url))
    try:
        await reset_tables(conn, TOPIC, s)
        await _apply(s, [_encode(e, False) for e in events], [2], per_record=100, dedup=False)
        rows = await conn.fetch("SELECT bucket, uniq_user_id FROM agg_only")
    finally:
        await conn.close()
    want: dict[Any, Any] = defaultdict(lambda: ds.hll_sketch(15, ds.tgt_hll_type.HLL_8))
    for e in events:
        want[_floor(e["ts"], "minute")].update(e["user"])
    assert {r["bucket"]: sketches.decode_uniq(r["uniq_user_id"]).get_estimate() for r in rows} == {
        b: sketches.decode_uniq(sketches.encode(h)).get_estimate() for b, h in want.items()
    }
