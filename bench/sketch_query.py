"""A 30-day daily distinct-user count, uncached (issue 19: "an uncached 30-day daily
`uniq_user_id` query p50"), beside the same query shape without sketches and beside the
planner's SQL alone, measured in the same run.

    PYTHONPATH=. .venv/bin/python -m bench.sketch_query [--runs 30] [--quick] [--reseed] [--json out.json]

Embedded Postgres (its data kept in build/bench-sketch-query, so a re-run reuses the seeded
database when its shape and the seed's expected answers match), Redis and Kafka (the query app
samples lag from it). `agg_events_by_type` holds 31 days of minute buckets x 10 (type, source)
pairs, 446,400 rows, each with `uniq_user_id` an HLL (lg_k 15, HLL_8, compact) of 10..30 user
ids and, except `page_view`'s, `quantiles_properties_amount` a KLL (k 400) of as many amounts,
count/sum/min/max consistent with them. They are built here in Python with schemas.sketches,
as the consumer builds them, and COPYed in; the hour and day tables are then rebuilt from them
by core.coarse (uniting the sketches in Python, as `tally migrate` would). User ids are drawn
from 20,000 with a per-day skew: day d draws from a window of 2,000..18,000 users, the front
of the window far more often than its end (the more so the later the type in TYPES: page_view
reaches more users than purchase), so each day's and type's distinct users differ.

One `tally query` process (the rollups file declares minute, hour and day tables, so 30 UTC
days read the day table: 300 rows). The queries, over the last 30 days of the data, closed,
`granularity=day`, `tz=UTC`, `limit=10000`:

  uniq    `fields=bucket,uniq_user_id`: each day's sketches of every type and source united
          (30 rows; 10 dense HLLs, ~32 KB each, per row): the figure;
  count   `fields=bucket,count`: the same table and shape without sketches (its limit);
  ranked  `fields=bucket,type,uniq_user_id,p95_properties_amount&order=-uniq_user_id`: ordered
          by a sketch field, so every group is ranked in Python (150 rows).

Each GET sends `Cache-Control: no-cache` (checked: `X-Cache: miss`, `meta.table` the day
table), one at a time on one keep-alive connection per query, the three alternating, `--runs`
of each after a warm-up. Beside them, each query's planner statement executed (and its rows
fetched) through an engine built as the service builds its read engine: what Postgres and the
driver alone cost to return the gathered sketches; and query.derived.finish on those rows,
timed in this process: what uniting them in Python costs. The answers are checked against
the seed: each day's (and day and type's) `uniq_user_id` must equal the estimate of an HLL
built here from that day's distinct users (same registers, so the same estimate, exactly),
and lie within 4 standard errors of the true distinct count; counts must be exact; each
p95 within twice the KLL's 99 % rank error of the true 95th percentile; the ranked rows in
order.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import orjson
from sqlalchemy.dialects import postgresql

from bench.query_latency import Http, spawn_query
from bench.rollup_seed import TABLE, TYPES, fill_coarse, plain_url
from core import devstack
from core.db import read_engine
from core.migrate import migrate
from core.settings import Settings
from query.catalog import Catalog
from query.derived import finish
from query.params import Limits, parse_query
from query.planner import plan
from schemas import sketches
from schemas.rollups import RollupSpec

ROLLUP = "events_by_type"
LG_K = 15
K = 400
DECLARATION = f"""
[[rollup]]
name = "events_by_type"
granularities = ["minute", "hour", "day"]
dimensions = ["type", "source"]
measures = ["count", "sum:properties.amount", "min:properties.amount", "max:properties.amount",
            "uniq:user_id:lg_k={LG_K}", "quantiles:properties.amount:k={K}"]
"""
BENCH_TYPES = TYPES[:5]  # page_view (no amounts), click, search, add_to_cart, purchase
BENCH_SOURCES = ("web", "ios")
PAIRS = tuple((t, s) for t in BENCH_TYPES for s in BENCH_SOURCES)
END = datetime(2026, 11, 1, tzinfo=UTC)  # fixed, so the seeded database can be reused run after run
DAYS = 30  # the query's range: the last 30 days of the data
SEED_DAYS = DAYS + 1  # one more day before it, which the query must leave out
USERS = 20_000
EVENTS_PER_ROW = (10, 30)  # each minute row counts 10..30 events (20 on average)
SEED = 19
SEED_VERSION = 1  # bump when the generator changes: a kept database of another version is re-seeded
P95_RANK_SLACK = 2 * sketches.quantile_error(K)  # twice the KLL's 99 % single-rank error
UNIQ_SIGMAS = 4.0
EXPLAINS = 5  # EXPLAIN ANALYZE runs per statement
DATA_DIR = Path("build/bench-sketch-query")
QUERIES: dict[str, list[tuple[str, str]]] = {
    "uniq": [("fields", "bucket,uniq_user_id")],
    "count": [("fields", "bucket,count")],
    "ranked": [("fields", "bucket,type,uniq_user_id,p95_properties_amount"), ("order", "-uniq_user_id")],
}


def percentile(values: list[float], p: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, int(len(data) * p))] if data else float("nan")


def summary(ms: list[float]) -> dict[str, Any]:
    return {
        "runs": len(ms),
        "p50_ms": round(percentile(ms, 0.5), 2),
        "p90_ms": round(percentile(ms, 0.9), 2),
        "p99_ms": round(percentile(ms, 0.99), 2),
        "min_ms": round(min(ms), 2),
        "max_ms": round(max(ms), 2),
    }


def iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- the seed ------------------------------------------------------------------------------------


def window(day: int) -> tuple[int, int]:
    """Day `day`'s users: (first, how many) of the 20,000, wrapping around."""
    return (day * 3_119) % USERS, 2_000 + (day * 7_919) % 16_000


def expected_uniq(names: list[str]) -> tuple[int, int]:
    """(true distinct count, the estimate Tally must answer) of a group whose distinct values are `names`.

    An HLL's registers depend only on the set of values, but its estimate also on how the sketch
    was built: one sketch fed every value keeps an in-order (HIP) estimate, a union of several a
    composite one. Tally's answer is always a union of several stored sketches, so the expected
    one is the union of two sketches of halves of the set: the same registers, the same estimate.
    """
    half = len(names) // 2
    united = sketches.merged([sketches.new_uniq(LG_K, names[:half]), sketches.new_uniq(LG_K, names[half:])])
    return len(names), round(float(united.get_estimate()))


def day_rows(day: int, names: list[str]) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    """Day `day` of the seed (0 is the first): its 14,400 base rows, and what queries must answer for it."""
    rng = np.random.default_rng([SEED, day])
    start = END - timedelta(days=SEED_DAYS - day)
    n_rows = 1440 * len(PAIRS)
    counts = rng.integers(EVENTS_PER_ROW[0], EVENTS_PER_ROW[1] + 1, n_rows)
    events = int(counts.sum())
    first, size = window(day)
    row_type = np.arange(n_rows) % len(PAIRS) // len(BENCH_SOURCES)
    event_type = np.repeat(row_type, counts)
    # Skewed to the window's front, the more so the later the type: page_view reaches more users than purchase.
    draws = rng.random(events) ** (2 + event_type)
    users = (first + (size * draws).astype(np.int64)) % USERS
    cents = np.maximum(1, np.round(np.exp(rng.normal(3.4, 0.8, events)) * 100)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    starts = offsets[:-1]
    sums, lows, highs = (f(cents, starts).tolist() for f in (np.add.reduceat, np.minimum.reduceat, np.maximum.reduceat))
    user_names = [names[u] for u in users.tolist()]
    amounts = (cents / 100).tolist()
    bounds = offsets.tolist()
    rows: list[tuple[Any, ...]] = []
    for r in range(n_rows):
        kind, source = PAIRS[r % len(PAIRS)]
        a, b = bounds[r], bounds[r + 1]
        bucket = start + timedelta(minutes=r // len(PAIRS))
        uniq = sketches.encode(sketches.new_uniq(LG_K, user_names[a:b]))
        if kind == "page_view":  # no numeric properties.amount: the amount measures stay NULL
            rows.append((bucket, kind, source, b - a, None, None, None, uniq, None))
            continue
        quantiles = sketches.encode(sketches.new_quantiles(K, amounts[a:b]))
        rows.append(
            (
                bucket,
                kind,
                source,
                b - a,
                Decimal(sums[r]).scaleb(-2),
                Decimal(lows[r]).scaleb(-2),
                Decimal(highs[r]).scaleb(-2),
                uniq,
                quantiles,
            )
        )

    # What the queries must answer for this day: all types, and each type (its two sources).
    distinct, estimate = expected_uniq([names[u] for u in np.unique(users).tolist()])
    by_type: dict[str, Any] = {}
    for t, kind in enumerate(BENCH_TYPES):
        mask = event_type == t
        t_distinct, t_estimate = expected_uniq([names[u] for u in np.unique(users[mask]).tolist()])
        p95: list[float] | None = None
        if kind != "page_view":
            values = np.sort(cents[mask])
            n = len(values)
            # The values whose true ranks, ((i + 1) / n inclusive, i / n exclusive), reach 0.95 +- the slack.
            lo = values[max(0, int(np.ceil((0.95 - P95_RANK_SLACK) * n)) - 1)]
            hi = values[min(n - 1, int(np.floor((0.95 + P95_RANK_SLACK) * n)))]
            p95 = [int(lo) / 100, int(hi) / 100]
        by_type[kind] = {
            "count": int(counts[row_type == t].sum()),
            "distinct": t_distinct,
            "estimate": t_estimate,
            "p95_range": p95,
        }
    expected = {"bucket": iso(start), "count": events, "distinct": distinct, "estimate": estimate, "types": by_type}
    return rows, expected


async def shape(url: str, spec: RollupSpec) -> dict[str, Any]:
    """What the tables hold now: rows per table, the base table's first and last bucket, its events."""
    conn = await asyncpg.connect(plain_url(url))
    try:
        rows = {t: int(await conn.fetchval(f'SELECT count(*) FROM "{t}"')) for t in spec.tables}  # noqa: S608
        first, last, events = await conn.fetchrow(f"SELECT min(bucket), max(bucket), sum(count) FROM {TABLE}")  # noqa: S608
    finally:
        await conn.close()
    return {"rows": rows, "first": first, "last": last, "events": int(events or 0)}


def wanted(spec: RollupSpec) -> dict[str, Any]:
    per = {"minute": 1, "hour": 60, "day": 1440}
    return {
        "rows": {spec.table_for(g): SEED_DAYS * 1440 // per[g] * len(PAIRS) for g in spec.granularities},
        "first": END - timedelta(days=SEED_DAYS),
        "last": END - timedelta(minutes=1),
    }


def load_expected(path: Path) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        expected = json.loads(path.read_text())
        if expected.get("version") == SEED_VERSION:
            return expected
    return None


async def seed(url: str, spec: RollupSpec) -> tuple[dict[str, Any], dict[str, float]]:
    """Empty the tables, COPY the base rows day by day (the next day built while one is copied),
    rebuild the coarse tables, VACUUM (ANALYZE). The expected answers, and seconds per step."""
    names = [f"user-{i:05d}" for i in range(USERS)]
    columns = [
        "bucket",
        "type",
        "source",
        "count",
        "sum_properties_amount",
        "min_properties_amount",
        "max_properties_amount",
        "uniq_user_id",
        "quantiles_properties_amount",
    ]
    missing = set(columns) - {"bucket", *spec.dimension_columns, *(m.column for m in spec.measures)}
    if missing:
        raise RuntimeError(f"{ROLLUP} has no column {', '.join(sorted(missing))}")
    seconds = {"generate": 0.0, "copy": 0.0}
    days: list[dict[str, Any]] = []
    started = time.perf_counter()
    conn = await asyncpg.connect(plain_url(url))
    try:
        await conn.execute("SET statement_timeout = 0")
        await conn.execute(f"TRUNCATE {', '.join(spec.tables)}")

        def build(day: int) -> tuple[list[tuple[Any, ...]], dict[str, Any], float]:
            t = time.perf_counter()
            rows, expected = day_rows(day, names)
            return rows, expected, time.perf_counter() - t

        pending = asyncio.create_task(asyncio.to_thread(build, 0))
        for day in range(SEED_DAYS):
            rows, expected, took = await pending
            seconds["generate"] += took
            if day + 1 < SEED_DAYS:
                pending = asyncio.create_task(asyncio.to_thread(build, day + 1))
            t = time.perf_counter()
            await conn.copy_records_to_table(TABLE, records=rows, columns=columns)
            seconds["copy"] += time.perf_counter() - t
            days.append(expected)
    finally:
        await conn.close()
    seconds["base"] = time.perf_counter() - started
    t = time.perf_counter()
    await fill_coarse(url, spec)  # core.coarse.fill_coarse_tables_at, then ANALYZE
    seconds["coarse"] = time.perf_counter() - t
    t = time.perf_counter()
    conn = await asyncpg.connect(plain_url(url))
    try:
        await conn.execute("SET statement_timeout = 0")
        for table in spec.tables:  # the visibility map, as autovacuum would set it on a long-lived table
            await conn.execute(f'VACUUM (ANALYZE) "{table}"')
    finally:
        await conn.close()
    seconds["vacuum"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    return {"version": SEED_VERSION, "events": sum(d["count"] for d in days), "days": days}, seconds


async def ensure_seeded(
    url: str, spec: RollupSpec, data_dir: Path, reseed: bool
) -> tuple[dict[str, Any], dict[str, float] | None]:
    """The expected answers of the kept database, seeding it first unless it holds this seed's shape."""
    path = data_dir / "expected.json"
    expected = None if reseed else load_expected(path)
    if expected is not None:
        held = await shape(url, spec)
        if {k: held[k] for k in ("rows", "first", "last")} == wanted(spec) and held["events"] == expected["events"]:
            return expected, None
    path.unlink(missing_ok=True)  # never beside a database it does not describe
    expected, seconds = await seed(url, spec)
    held = await shape(url, spec)
    if {k: held[k] for k in ("rows", "first", "last")} != wanted(spec) or held["events"] != expected["events"]:
        raise RuntimeError(f"seeding gave {held}, not {wanted(spec)} with {expected['events']} events")
    path.write_text(json.dumps(expected))
    return expected, seconds


# -- the measurement -----------------------------------------------------------------------------


def query_items(name: str) -> list[tuple[str, str]]:
    return [
        ("from", iso(END - timedelta(days=DAYS))),
        ("to", iso(END)),
        ("granularity", "day"),
        ("tz", "UTC"),
        *QUERIES[name],
        ("limit", "10000"),
    ]


async def timed(get: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = await get()
    return (time.perf_counter() - started) * 1000, out


def check(answers: dict[str, list[dict[str, Any]]], expected: dict[str, Any]) -> dict[str, Any]:
    """Hold every answer to the seed; what the distinct counts' errors were."""
    days = {d["bucket"]: d for d in expected["days"][-DAYS:]}
    buckets = list(days)

    def fail(what: str) -> None:
        raise AssertionError(what)

    uniq, count = answers["uniq"], answers["count"]
    if [r["bucket"] for r in uniq] != buckets or [r["bucket"] for r in count] != buckets:
        fail(f"the days answered are not the {DAYS} of the range: {[r['bucket'] for r in uniq]}")
    errors: list[float] = []
    for r in uniq:
        want = days[r["bucket"]]
        if r["uniq_user_id"] != want["estimate"]:
            fail(f"{r['bucket']}: uniq_user_id {r['uniq_user_id']}, the seed's HLL estimates {want['estimate']}")
        errors.append(r["uniq_user_id"] / want["distinct"] - 1)
    for r in count:
        if r["count"] != days[r["bucket"]]["count"]:
            fail(f"{r['bucket']}: count {r['count']}, the seed wrote {days[r['bucket']]['count']}")
    ranked = answers["ranked"]
    if len(ranked) != DAYS * len(BENCH_TYPES):
        fail(f"ranked: {len(ranked)} rows, not {DAYS * len(BENCH_TYPES)}")
    if any(a["uniq_user_id"] < b["uniq_user_id"] for a, b in itertools.pairwise(ranked)):
        fail("ranked: the rows are not in descending uniq_user_id order")
    p95_checked = 0
    for r in ranked:
        want = days[r["bucket"]]["types"][r["type"]]
        if r["uniq_user_id"] != want["estimate"]:
            got = r["uniq_user_id"]
            fail(f"{r['bucket']} {r['type']}: uniq_user_id {got}, the seed's HLL estimates {want['estimate']}")
        errors.append(r["uniq_user_id"] / want["distinct"] - 1)
        if want["p95_range"] is None:
            if r["p95_properties_amount"] is not None:
                fail(f"{r['bucket']} {r['type']}: p95 {r['p95_properties_amount']} of no amounts")
            continue
        lo, hi = want["p95_range"]
        if not lo <= r["p95_properties_amount"] <= hi:
            fail(f"{r['bucket']} {r['type']}: p95 {r['p95_properties_amount']} outside [{lo}, {hi}]")
        p95_checked += 1
    sigma = sketches.uniq_error(LG_K)
    worst = max(abs(e) for e in errors)
    if worst > UNIQ_SIGMAS * sigma:
        fail(f"a distinct count is {worst:.2%} off the true count, beyond {UNIQ_SIGMAS:g} standard errors")
    return {
        "uniq_checked": len(errors),
        "p95_checked": p95_checked,
        "uniq_worst_error": round(worst, 5),
        "uniq_sigma": round(sigma, 5),
        "uniq_mean_abs_error": round(sum(map(abs, errors)) / len(errors), 5),
    }


async def measure(settings: Settings, expected: dict[str, Any], runs: int, warmup: int) -> dict[str, Any]:
    """The figures: per query, GET, SQL alone and finish (in-process) timings; the answers checked."""
    names = list(QUERIES)
    items = {n: query_items(n) for n in names}
    paths = {n: f"/v1/rollups/{ROLLUP}?" + urllib.parse.urlencode(items[n], safe=",:") for n in names}
    clients = {n: Http(settings.query_port, {"Cache-Control": "no-cache"}) for n in names}
    http_ms: dict[str, list[float]] = {n: [] for n in names}
    pages: dict[str, dict[str, Any]] = {}
    for n, client in clients.items():
        await client.open([paths[n]])
    try:
        for i in range(warmup + runs):
            for n, client in clients.items():  # alternating: each sees the same moments of the machine
                ms, (status, headers, body) = await timed(client.get)
                if status != 200 or headers.get(b"x-cache") != b"miss":
                    raise AssertionError(f"{n}: {status} X-Cache {headers.get(b'x-cache')!r}: {body[:300]!r}")
                if i >= warmup:
                    http_ms[n].append(ms)
                pages[n] = orjson.loads(body)
    finally:
        for client in clients.values():
            await client.close()
    day_table = f"{TABLE}__day"
    for n, page in pages.items():
        if page["meta"]["table"] != day_table:
            raise AssertionError(f"{n}: meta.table {page['meta']['table']}, not {day_table}")
    checked = check({n: p["data"] for n, p in pages.items()}, expected)

    # Each planner statement through an engine built as the service's read engine; then finish on its rows.
    rollup = Catalog(settings.rollups).get(ROLLUP)
    limits = Limits(default_limit=settings.default_limit, max_limit=settings.max_limit, max_offset=settings.max_offset)
    now = datetime.now(UTC)
    queries = {n: parse_query(rollup.spec, items[n], limits, now) for n in names}
    statements = {}
    for n, q in queries.items():
        source = rollup.source(q)
        statements[n] = plan(rollup.spec, source.table, q, stored=source.granularity)
    literal = {"compile_kwargs": {"literal_binds": True}, "dialect": postgresql.dialect()}
    literal_sql = {n: str(stmt.compile(**literal)) for n, stmt in statements.items()}  # type: ignore[arg-type]
    sql_ms: dict[str, list[float]] = {n: [] for n in names}
    fetched: dict[str, list[Any]] = {}
    executed: dict[str, dict[str, Any]] = {}
    engine = read_engine(str(settings.postgres_url), pool_size=1, statement_timeout_ms=settings.statement_timeout_ms)
    try:
        async with engine.connect() as conn:
            for i in range(warmup + runs):
                for n, stmt in statements.items():
                    ms, rows = await timed(lambda stmt=stmt: _fetch(conn, stmt))
                    if i >= warmup:
                        sql_ms[n].append(ms)
                    fetched[n] = rows
            # Postgres's own share: the statements' execution time as EXPLAIN ANALYZE reports it (no
            # transfer, no decoding), and where its executor spilled to disk.
            driver = (await conn.get_raw_connection()).driver_connection
            for n in names:
                times: list[float] = []
                for _ in range(EXPLAINS):
                    explained = await driver.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {literal_sql[n]}")
                    top = (json.loads(explained) if isinstance(explained, str) else explained)[0]
                    times.append(top["Execution Time"])
                executed[n] = {"p50_ms": round(percentile(times, 0.5), 2), "spills": spills(top["Plan"])}
    finally:
        await engine.dispose()
    finish_ms: dict[str, list[float]] = {n: [] for n in names}
    for i in range(warmup + runs):
        for n in names:
            started = time.perf_counter()
            page = finish(rollup.spec, queries[n], fetched[n])
            if i >= warmup:
                finish_ms[n].append((time.perf_counter() - started) * 1000)
            # The exact fields (the distinct counts, the counts) as the GET answered them.
            fields = queries[n].fields
            exact = [f for f in ("uniq_user_id", "count") if f in fields]
            mine = [[int(r[fields.index(f)]) for f in exact] for r in page.rows[: queries[n].limit]]
            if mine != [[r[f] for f in exact] for r in pages[n]["data"]]:
                raise AssertionError(f"{n}: finish on the statement's rows differs from the GET's answer")
    # What the uniq query's unite consists of: decoding its sketches alone, and the bytes it fetches.
    stored = [b for row in fetched["uniq"] for b in row[1]]
    decode_ms: list[float] = []
    for i in range(warmup + runs):
        started = time.perf_counter()
        for b in stored:
            sketches.decode_uniq(bytes(b))
        if i >= warmup:
            decode_ms.append((time.perf_counter() - started) * 1000)
    return {
        "result_rows": {n: len(p["data"]) for n, p in pages.items()},
        "rows_read": {n: p["meta"]["rows_read"] for n, p in pages.items()},
        "table": day_table,
        "body_bytes": {n: len(orjson.dumps(p["data"])) for n, p in pages.items()},
        "uniq_sketches_fetched": len(stored),
        "uniq_sketch_bytes_fetched": sum(len(b) for b in stored),
        "http": {n: summary(v) for n, v in http_ms.items()},
        "sql": {n: summary(v) for n, v in sql_ms.items()},
        "finish": {n: summary(v) for n, v in finish_ms.items()},
        "uniq_decode_alone": summary(decode_ms),
        "checked": checked,
        "executed": executed,
        "statements": literal_sql,
    }


def spills(node: dict[str, Any]) -> list[str]:
    """The plan nodes (EXPLAIN's JSON) that went to disk: a sort that did not fit in work_mem, a
    hash aggregate that ran in batches."""
    out = []
    if node.get("Sort Space Type") == "Disk":
        out.append(f"sort ({node.get('Sort Method')}) {node.get('Sort Space Used')} kB on disk")
    if int(node.get("HashAgg Batches", 1)) > 1:
        out.append(f"hash aggregate in {node['HashAgg Batches']} batches, {node.get('Disk Usage')} kB on disk")
    for child in node.get("Plans", ()):
        out += spills(child)
    return out


async def _fetch(conn: Any, stmt: Any) -> list[Any]:
    """As query.service runs the page query: execute, then every row."""
    return list((await conn.execute(stmt)).all())


# -- the run -------------------------------------------------------------------------------------


def run(
    *, runs: int = 30, warmup: int = 3, quick: bool = False, reseed: bool = False, data_dir: Path = DATA_DIR
) -> dict[str, Any]:
    """Embedded servers over the kept database, one `tally query` process; the figures."""
    if quick:
        runs, warmup = min(runs, 10), min(warmup, 2)
    data_dir.mkdir(parents=True, exist_ok=True)
    rollups_file = data_dir / "rollups.toml"
    rollups_file.write_text(DECLARATION)
    servers = [
        devstack.kafka(devstack.free_port()).start(),
        devstack.postgres(data_dir / "pg" / "data", devstack.free_port(), durable=False).start(),
        devstack.redis(devstack.free_port()).start(),
    ]
    settings = Settings(
        env="test",
        drain_seconds=0,
        kafka_bootstrap=servers[0].url,
        postgres_url=servers[1].url,
        redis_url=servers[2].url,
        log_level="warning",
        auth=False,
        rollups_file=rollups_file,
        query_port=devstack.free_port(),
        cache_prefix="bench-sketch:",
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        asyncio.run(migrate(settings))
        spec = settings.rollups[0]
        expected, seed_seconds = asyncio.run(ensure_seeded(str(settings.postgres_url), spec, data_dir, reseed))
        held = asyncio.run(shape(str(settings.postgres_url), spec))
        procs.append(spawn_query(settings, data_dir / "query.log"))
        row = asyncio.run(measure(settings, expected, runs, warmup))
    finally:
        for proc in procs:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        for s in reversed(servers):
            s.stop()
    http, sql = row["http"], row["sql"]
    return {
        "benchmark": "sketch_query",
        "rows_in_tables": held["rows"],
        "data_from": held["first"].isoformat(),
        "data_to": (held["last"] + timedelta(minutes=1)).isoformat(),
        "seeded_now": seed_seconds is not None,
        "seed_seconds": {k: round(v, 1) for k, v in (seed_seconds or {}).items()},
        "queries": {n: dict(query_items(n)) for n in QUERIES},
        "cores": os.cpu_count(),
        "precision": {"lg_k": LG_K, "k": K},
        **row,
        "ratios": {
            "uniq_to_count_http_p50": round(http["uniq"]["p50_ms"] / http["count"]["p50_ms"], 1),
            "uniq_to_sql_p50": round(http["uniq"]["p50_ms"] / sql["uniq"]["p50_ms"], 1),
            "ranked_to_count_http_p50": round(http["ranked"]["p50_ms"] / http["count"]["p50_ms"], 1),
        },
    }


def report(row: dict[str, Any]) -> Iterable[str]:
    tables = ", ".join(f"{t} {n:,}" for t, n in row["rows_in_tables"].items())
    yield f"rows: {tables}; minute buckets {row['data_from']} .. {row['data_to']}; {row['cores']} cores shared"
    q = row["queries"]["uniq"]
    yield (
        f"range {q['from']} .. {q['to']} (closed), granularity=day, tz=UTC, limit=10000, from {row['table']}; "
        f"uncached (no-cache, X-Cache: miss), 1 connection per query, sequential, the three alternating"
    )
    yield (
        f"uniq fetches {row['uniq_sketches_fetched']} HLLs (lg_k {row['precision']['lg_k']}), "
        f"{row['uniq_sketch_bytes_fetched'] / 1e6:.1f} MB, for {row['result_rows']['uniq']} rows"
    )
    yield f"{'':80} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'rows':>5} {'read':>5}"
    labels = {
        "uniq": "fields=bucket,uniq_user_id",
        "count": "fields=bucket,count (no sketches)",
        "ranked": "fields=bucket,type,uniq_user_id,p95_properties_amount&order=-uniq_user_id",
    }

    def line(label: str, p: dict[str, Any], tail: str = "") -> str:
        return f"{label:80} {p['p50_ms']:8.2f} {p['p90_ms']:8.2f} {p['p99_ms']:8.2f}{tail}"

    for n, label in labels.items():
        yield line(f"GET {label}", row["http"][n], f" {row['result_rows'][n]:>5} {row['rows_read'][n]:>5}")
        yield line("  its SQL alone (execute + fetch, the read engine)", row["sql"][n])
        e = row["executed"][n]
        spilled = f"; spilled: {', '.join(e['spills'])}" if e["spills"] else ""
        yield f"{'    of which Postgres executing it (EXPLAIN ANALYZE)':80} {e['p50_ms']:8.2f}{spilled}"
        yield line("  query.derived.finish on those rows (in-process)", row["finish"][n])
    yield line("  of uniq's finish: decoding its HLLs alone", row["uniq_decode_alone"])
    r, http, sql, fin = row["ratios"], row["http"]["uniq"], row["sql"]["uniq"], row["finish"]["uniq"]
    rest = http["p50_ms"] - sql["p50_ms"] - fin["p50_ms"]
    yield (
        f"uniq GET p50 {http['p50_ms']:.1f} ms = {r['uniq_to_count_http_p50']}x the count GET's (same table and shape, "
        f"no sketches), {r['uniq_to_sql_p50']}x its SQL alone; SQL {sql['p50_ms']:.1f} + finish {fin['p50_ms']:.1f} "
        f"+ the rest (service, render, HTTP) {rest:.1f} ms. ranked / count GET p50 {r['ranked_to_count_http_p50']}x"
    )
    c = row["checked"]
    yield (
        f"checked: {c['uniq_checked']} distinct counts equal the seed's HLL estimates "
        f"(worst {c['uniq_worst_error']:.2%} off the true count, sigma {c['uniq_sigma']:.2%}), "
        f"{c['p95_checked']} p95 within the KLL's rank error, counts exact, the ranked order"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30, help="measured GETs per query")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10 runs, 2 warm-up (for a suite)")
    parser.add_argument("--reseed", action="store_true", help="seed even if the kept database has this shape")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    row = run(runs=args.runs, warmup=args.warmup, quick=args.quick, reseed=args.reseed, data_dir=args.data_dir)
    for line in report(row):
        print(line)
    s = row["seed_seconds"]
    seeded = (
        f"seeded in {s['total']} s: base rows {s['base']} s (sketches built {s['generate']} s, COPY {s['copy']} s), "
        f"coarse tables {s['coarse']} s, VACUUM {s['vacuum']} s"
        if row["seeded_now"]
        else "reused the seeded database"
    )
    print(f"({seeded}; {time.perf_counter() - started:.0f} s in all)")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2, default=str))


if __name__ == "__main__":
    main()
