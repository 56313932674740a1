"""A 90-day hourly dashboard over a year of minute data, from the hour table beside the same
query forced onto the minute table (issue 18, item 2: "coarser tables").

    PYTHONPATH=. .venv/bin/python -m bench.long_range [--runs 30] [--reseed] [--json out.json]

Embedded Postgres (its data kept in build/bench-long-range, so a re-run reuses the seeded
database when its shape matches), Redis and Kafka (the query app samples lag from it).
`agg_events_by_type` holds a year of minute buckets x 10 (type, source) pairs, 5,256,000
rows (bench.rollup_seed, written inside Postgres), and its hour and day tables rebuilt from
them by core.coarse, as the consumer keeps them. Two `tally query` processes read that one
database: one whose rollups file declares minute, hour and day tables (it reads the coarsest
that serves a query), and one whose file declares the minute table alone (every query is
forced onto the base table and re-bucketed with date_trunc, as before issue 18).

The query: the last 90 days of the data, closed, `granularity=hour`,
`fields=bucket,count,sum_properties_amount`, `filter[type]=purchase`, `limit=10000`: one
series of 2,160 hourly points, merged from 2 sources. Each GET sends `Cache-Control:
no-cache`, so every answer is computed (checked: `X-Cache: miss`), one request at a time
on one keep-alive connection, coarse and base alternating, `--runs` of each after a
warm-up. Beside them, the planner's statement for each table run directly through an
engine built as the service builds its own: what Postgres alone costs. Both services
must answer the same rows, and `meta.table` must name the hour table and the base table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from sqlalchemy.dialects import postgresql

from bench.query_latency import Http, spawn_query
from bench.rollup_seed import TABLE, TYPES, plain_url, seed_rollup
from core import devstack
from core.db import read_engine
from core.migrate import migrate
from core.settings import Settings
from query.catalog import Catalog
from query.params import Limits, parse_query
from query.planner import plan
from schemas.rollups import RollupSpec

ROLLUP = "events_by_type"
DECLARATION = """
[[rollup]]
name = "events_by_type"
{granularity}
dimensions = ["type", "source"]
measures = ["count", "sum:properties.amount", "min:properties.amount", "max:properties.amount"]
"""
COARSE = 'granularities = ["minute", "hour", "day"]'
BASE = 'granularity = "minute"'
BENCH_TYPES = TYPES[:5]
BENCH_SOURCES = ("web", "ios")
MINUTES = 365 * 24 * 60
END = datetime(2026, 11, 1, tzinfo=UTC)  # fixed, so the seeded database can be reused run after run
DAYS = 90
TARGET_P50_MS = 20.0
DATA_DIR = Path("build/bench-long-range")


def percentile(values: list[float], p: float) -> float:
    data = sorted(values)
    return data[min(len(data) - 1, int(len(data) * p))] if data else float("nan")


def summary(ms: list[float]) -> dict[str, Any]:
    return {"runs": len(ms), "p50_ms": round(percentile(ms, 0.5), 2), "p95_ms": round(percentile(ms, 0.95), 2),
            "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2)}


# -- the database --------------------------------------------------------------------------------


async def shape(url: str, spec: RollupSpec) -> dict[str, Any]:
    """What the tables hold now: rows per table, and the base table's first and last bucket."""
    conn = await asyncpg.connect(plain_url(url))
    try:
        rows = {t: int(await conn.fetchval(f'SELECT count(*) FROM "{t}"')) for t in spec.tables}  # noqa: S608
        first, last = await conn.fetchrow(f"SELECT min(bucket), max(bucket) FROM {TABLE}")  # noqa: S608
    finally:
        await conn.close()
    return {"rows": rows, "first": first, "last": last}


def wanted(spec: RollupSpec, minutes: int) -> dict[str, Any]:
    groups = len(BENCH_TYPES) * len(BENCH_SOURCES)
    per = {"minute": 1, "hour": 60, "day": 1440}
    return {
        "rows": {spec.table_for(g): minutes // per[g] * groups for g in spec.granularities},
        "first": END - timedelta(minutes=minutes),
        "last": END - timedelta(minutes=1),
    }


async def ensure_seeded(url: str, spec: RollupSpec, minutes: int, reseed: bool) -> tuple[bool, float]:
    """Seed (base rows, coarse tables, ANALYZE) unless the database already holds this shape."""
    if not reseed and await shape(url, spec) == wanted(spec, minutes):
        return False, 0.0
    started = time.perf_counter()
    conn = await asyncpg.connect(plain_url(url))
    try:
        await conn.execute(f"TRUNCATE {', '.join(spec.tables)}")
    finally:
        await conn.close()
    await seed_rollup(url, minutes * len(BENCH_TYPES) * len(BENCH_SOURCES), end=END, types=BENCH_TYPES,
                      sources=BENCH_SOURCES, spec=spec)
    conn = await asyncpg.connect(plain_url(url))
    try:
        await conn.execute("SET statement_timeout = 0")
        for table in spec.tables:  # the visibility map, as autovacuum would set it on a long-lived table
            await conn.execute(f'VACUUM (ANALYZE) "{table}"')
    finally:
        await conn.close()
    got = await shape(url, spec)
    if got != wanted(spec, minutes):
        raise RuntimeError(f"seeding gave {got}, not {wanted(spec, minutes)}")
    return True, time.perf_counter() - started


# -- the measurement -----------------------------------------------------------------------------


def query_items(minutes: int) -> list[tuple[str, str]]:
    days = min(DAYS, minutes // 1440)
    iso = "%Y-%m-%dT%H:%M:%SZ"
    return [
        ("from", (END - timedelta(days=days)).strftime(iso)),
        ("to", END.strftime(iso)),
        ("granularity", "hour"),
        ("fields", "bucket,count,sum_properties_amount"),
        ("filter[type]", "purchase"),
        ("limit", "10000"),
    ]


def _data(body: bytes) -> tuple[Any, dict[str, Any]]:
    page = orjson.loads(body)
    return page["data"], page["meta"]


async def timed(get: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    out = await get()
    return (time.perf_counter() - started) * 1000, out


async def measure(coarse: Settings, base: Settings, items: list[tuple[str, str]], runs: int,
                  warmup: int) -> dict[str, Any]:
    path = f"/v1/rollups/{ROLLUP}?" + "&".join(f"{k}={v}" for k, v in items)
    clients = {"coarse": Http(coarse.query_port, {"Cache-Control": "no-cache"}),
               "base": Http(base.query_port, {"Cache-Control": "no-cache"})}
    http_ms: dict[str, list[float]] = {"coarse": [], "base": []}
    answers: dict[str, tuple[Any, dict[str, Any]]] = {}
    for client in clients.values():
        await client.open([path])
    try:
        for i in range(warmup + runs):
            for side, client in clients.items():  # alternating: both see the same moments of the machine
                ms, (status, headers, body) = await timed(client.get)
                if status != 200 or headers.get(b"x-cache") != b"miss":
                    raise AssertionError(f"{side}: {status} X-Cache {headers.get(b'x-cache')!r}: {body[:300]!r}")
                if i >= warmup:
                    http_ms[side].append(ms)
                answers[side] = _data(body)
    finally:
        for client in clients.values():
            await client.close()
    (coarse_rows, coarse_meta), (base_rows, base_meta) = answers["coarse"], answers["base"]
    if coarse_rows != base_rows:
        raise AssertionError("the hour table and the minute table answered different rows")
    if (coarse_meta["table"], base_meta["table"]) != (f"{TABLE}__hour", TABLE):
        raise AssertionError(f"meta.table: coarse {coarse_meta['table']}, base {base_meta['table']}")

    # The planner's statement for each table, through an engine built as the service's read engine.
    rollup = Catalog(coarse.rollups).get(ROLLUP)
    limits = Limits(default_limit=coarse.default_limit, max_limit=coarse.max_limit, max_offset=coarse.max_offset)
    q = parse_query(rollup.spec, items, limits, datetime.now(UTC))
    chosen = rollup.source(q)
    statements = {"coarse": plan(rollup.spec, chosen.table, q, stored=chosen.granularity),
                  "base": plan(rollup.spec, rollup.table, q)}
    sql_ms: dict[str, list[float]] = {"coarse": [], "base": []}
    engine = read_engine(str(coarse.postgres_url), pool_size=1, statement_timeout_ms=coarse.statement_timeout_ms)
    try:
        async with engine.connect() as conn:
            for i in range(warmup + runs):
                for side, stmt in statements.items():
                    ms, result = await timed(lambda stmt=stmt: conn.execute(stmt))
                    if len(result.all()) != len(coarse_rows):
                        raise AssertionError(f"{side}: the statement returned another number of rows")
                    if i >= warmup:
                        sql_ms[side].append(ms)
    finally:
        await engine.dispose()
    literal = {"compile_kwargs": {"literal_binds": True}, "dialect": postgresql.dialect()}
    return {
        "result_rows": len(coarse_rows),
        "body_bytes": len(orjson.dumps(coarse_rows)),
        "rows_read": {"coarse": coarse_meta["rows_read"], "base": base_meta["rows_read"]},
        "tables": {"coarse": coarse_meta["table"], "base": base_meta["table"]},
        "http_coarse": summary(http_ms["coarse"]),
        "http_base": summary(http_ms["base"]),
        "sql_coarse": summary(sql_ms["coarse"]),
        "sql_base": summary(sql_ms["base"]),
        "sql": {side: str(stmt.compile(**literal)) for side, stmt in statements.items()},  # type: ignore[arg-type]
    }


# -- the run -------------------------------------------------------------------------------------


def run(*, runs: int = 30, warmup: int = 3, minutes: int = MINUTES, reseed: bool = False,
        data_dir: Path = DATA_DIR) -> dict[str, Any]:
    """Embedded servers over the kept database, two `tally query` processes; the figures."""
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {name: data_dir / f"{name}.toml" for name in ("coarse", "base")}
    files["coarse"].write_text(DECLARATION.format(granularity=COARSE))
    files["base"].write_text(DECLARATION.format(granularity=BASE))
    servers = [
        devstack.kafka(devstack.free_port()).start(),
        devstack.postgres(data_dir / "pg" / "data", devstack.free_port(), durable=False).start(),
        devstack.redis(devstack.free_port()).start(),
    ]
    common: dict[str, Any] = {
        "env": "test", "drain_seconds": 0, "kafka_bootstrap": servers[0].url, "postgres_url": servers[1].url,
        "redis_url": servers[2].url, "log_level": "warning", "auth": False,
    }
    coarse = Settings(**common, rollups_file=files["coarse"], query_port=devstack.free_port(),
                      cache_prefix="bench-long-c:")
    base = Settings(**common, rollups_file=files["base"], query_port=devstack.free_port(),
                    cache_prefix="bench-long-b:")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        asyncio.run(migrate(coarse))
        spec = coarse.rollups[0]
        seeded, seed_seconds = asyncio.run(ensure_seeded(str(coarse.postgres_url), spec, minutes, reseed))
        held = asyncio.run(shape(str(coarse.postgres_url), spec))
        procs.append(spawn_query(coarse, data_dir / "query-coarse.log"))
        procs.append(spawn_query(base, data_dir / "query-base.log"))
        items = query_items(minutes)
        row = asyncio.run(measure(coarse, base, items, runs, warmup))
    finally:
        for proc in procs:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        for s in reversed(servers):
            s.stop()
    c, b = row["http_coarse"], row["http_base"]
    return {
        "benchmark": "long_range",
        "rows_in_tables": held["rows"],
        "data_from": held["first"].isoformat(),
        "data_to": (held["last"] + timedelta(minutes=1)).isoformat(),
        "seeded_now": seeded,
        "seed_seconds": round(seed_seconds, 1),
        "query": dict(items),
        "cores": os.cpu_count(),
        **row,
        "ratio_base_to_coarse": {"http_p50": round(b["p50_ms"] / c["p50_ms"], 1),
                                 "http_p95": round(b["p95_ms"] / c["p95_ms"], 1),
                                 "sql_p50": round(row["sql_base"]["p50_ms"] / row["sql_coarse"]["p50_ms"], 1)},
        "target_p50_ms": TARGET_P50_MS,
        "met": c["p50_ms"] < TARGET_P50_MS,
    }


def report(row: dict[str, Any]) -> Iterable[str]:
    q = row["query"]
    tables = ", ".join(f"{t} {n:,}" for t, n in row["rows_in_tables"].items())
    yield f"rows: {tables}; minute buckets {row['data_from']} .. {row['data_to']}; {row['cores']} cores shared"
    yield (
        f"query: {q['from']} .. {q['to']}, granularity={q['granularity']}, fields={q['fields']}, "
        f"filter[type]={q['filter[type]']} -> {row['result_rows']:,} rows; uncached (no-cache, X-Cache: miss), "
        f"1 connection, sequential, coarse and base alternating"
    )
    yield f"{'':58} {'p50 ms':>8} {'p95 ms':>8} {'rows read':>10}"
    lines = (
        ("http_coarse", f"GET, coarse tables (meta.table {row['tables']['coarse']})", "coarse"),
        ("http_base", f"GET, forced onto the base table ({row['tables']['base']})", "base"),
        ("sql_coarse", "planner's SQL alone, hour table", "coarse"),
        ("sql_base", "planner's SQL alone, minute table", "base"),
    )
    for key, label, side in lines:
        p = row[key]
        yield f"{label:58} {p['p50_ms']:8.2f} {p['p95_ms']:8.2f} {row['rows_read'][side]:>10,}"
    r = row["ratio_base_to_coarse"]
    yield (
        f"base / coarse: GET p50 {r['http_p50']}x, p95 {r['http_p95']}x; SQL p50 {r['sql_p50']}x. "
        f"Target: coarse GET p50 < {row['target_p50_ms']:g} ms: {'met' if row['met'] else 'NOT met'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30, help="measured GETs per side")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--minutes", type=int, default=MINUTES, help="minutes of data (default a year)")
    parser.add_argument("--reseed", action="store_true", help="seed even if the kept database has this shape")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    row = run(runs=args.runs, warmup=args.warmup, minutes=args.minutes, reseed=args.reseed, data_dir=args.data_dir)
    for line in report(row):
        print(line)
    seeded = f"seeded in {row['seed_seconds']} s" if row["seeded_now"] else "reused the seeded database"
    print(f"({seeded}; {time.perf_counter() - started:.0f} s in all)")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2, default=str))


if __name__ == "__main__":
    main()
