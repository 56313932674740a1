"""Query API latency for one typical dashboard query, each figure beside its limit measured in
the same run: a cache hit beside a bare Redis GET of the very cache entry, and an uncached
read beside the planner's statement run directly on Postgres.

    .venv/bin/python -m bench.query_latency [--rows 1512000] [--seconds 10] [--concurrency 8] [--json out.json]

Embedded Postgres, Redis and Kafka (the query app requires a bootstrap address and samples
lag from it), `tally migrate`, `--rows` rows of `agg_events_by_type` (bench.rollup_seed: minute
buckets, 10 types x 15 sources; the default is 7 days of them), then one `tally query` process.
The query: a closed 24 h range (older than the lateness window, so cached for an hour),
`granularity=hour`, `fields=bucket,type,count,sum_properties_amount`, two types. Phases, each
at `--concurrency` after a short warm-up:

(a) cached: GETs answered from Redis (every response checked: `X-Cache: hit`, the same rows);
(c) bare Redis GET of that entry's key with redis.asyncio, configured as the service's client
    ((a) and (c) alternate in --rounds rounds, so that each is measured moments from the other);
    then (a) and (c) again, paced at a quarter of (a)'s saturated rate, for the p99 at a usual
    load; and the query process's CPU per hit in (a);
(b) uncached: GETs with `Cache-Control: no-cache` (every response `X-Cache: miss`, the same
    rows). Identical concurrent misses share one computation (single flight), so each connection
    asks with its own `limit` (1000, 999, ...: the same rows and SQL, another cache key), and the
    service's /metrics must count exactly one Postgres read per request;
(d) bare SQL: the planner's statement for the query, executed through an SQLAlchemy async engine
    configured as the service's read engine (asyncpg, prepared statements, the same pool size);
(e) the same with Postgres's default `plan_cache_mode` (auto) instead of the read engine's
    `force_custom_plan`: asyncpg prepares every statement, and after 5 executions Postgres
    may switch a prepared statement to a generic plan, one made without the parameter values
    (see docs/query-plans.md); this shows what the read engine's setting saves.

The HTTP load generator is raw asyncio streams on uvloop (a few microseconds per request); the
CPU each process used is printed per phase, so a saturated client would show. `run()` returns
the figures, for bench.suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import uvloop
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench.procs import cpu_seconds
from bench.rollup_seed import Seeded, seed_rollup
from core import devstack
from core.cache import redis_client
from core.db import asyncpg_url, read_engine
from core.migrate import migrate
from core.settings import Settings
from query.catalog import Catalog
from query.params import Limits, parse_query
from query.planner import plan

ROLLUP = "events_by_type"
FIELDS = "bucket,type,count,sum_properties_amount"
TYPES = "add_to_cart,purchase"


# -- measurement -------------------------------------------------------------------------------


@dataclass
class Phase:
    """Latencies of one phase's operations, and the CPU each process spent meanwhile."""

    name: str
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core
    extra: dict[str, Any] = field(default_factory=dict)

    def percentile(self, p: float) -> float:
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(len(data) * p))] * 1000 if data else float("nan")

    @property
    def p50(self) -> float:
        return self.percentile(0.50)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else float("nan")

    def row(self) -> dict[str, Any]:
        return {
            "operations": len(self.latencies),
            "seconds": round(self.seconds, 2),
            "per_s": round(self.rate, 1),
            "p50_ms": round(self.percentile(0.50), 3),
            "p99_ms": round(self.percentile(0.99), 3),
            "cpu_percent_of_one_core": {k: round(v) for k, v in self.cpu.items()},
            **self.extra,
        }


@dataclass(frozen=True)
class Processes:
    """Whose CPU is reported: this process (the load generator), Tally's query server, the servers."""

    query: int
    postgres: int
    redis: int

    def sample(self) -> dict[str, float]:
        return {
            "client": time.process_time(),
            "tally-query": cpu_seconds(self.query),
            "postgres": cpu_seconds(self.postgres, children=True),
            "redis": cpu_seconds(self.redis),
        }


async def timed(
    phase: Phase, procs: Processes, operation: Callable[[], Awaitable[None]], *, seconds: float, concurrency: int
) -> Phase:
    """Run `operation` back to back in `concurrency` tasks for `seconds`; record each latency."""

    async def worker(deadline: float) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await operation()
            phase.latencies.append(time.perf_counter() - started)

    before = procs.sample()
    started = time.perf_counter()
    await asyncio.gather(*(worker(started + seconds) for _ in range(concurrency)))
    phase.seconds = time.perf_counter() - started
    after = procs.sample()
    phase.cpu = {k: (after[k] - before[k]) / phase.seconds * 100 for k in before}
    return phase


async def paced(
    phase: Phase, procs: Processes, operation: Callable[[], Awaitable[None]], *, seconds: float, rate: float,
    concurrency: int,
) -> Phase:
    """Run `operation` at `rate` per second in all (each of `concurrency` tasks on its own schedule,
    open loop as long as an operation is shorter than its slot); record each latency."""
    interval = concurrency / rate

    async def worker(first: float, deadline: float) -> None:
        due = first
        while due < deadline:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            started = time.perf_counter()
            await operation()
            phase.latencies.append(time.perf_counter() - started)
            due += interval

    before = procs.sample()
    started = time.perf_counter()
    await asyncio.gather(*(worker(started + i * interval / concurrency, started + seconds)
                           for i in range(concurrency)))
    phase.seconds = time.perf_counter() - started
    after = procs.sample()
    phase.cpu = {k: (after[k] - before[k]) / phase.seconds * 100 for k in before}
    return phase


def merged(name: str, rounds: Sequence[Phase]) -> Phase:
    """One phase from rounds run at different moments: their latencies, their summed time, their
    CPU weighted by time."""
    out = Phase(name)
    for r in rounds:
        out.latencies += r.latencies
        out.seconds += r.seconds
        for k, v in r.cpu.items():
            out.cpu[k] = out.cpu.get(k, 0.0) + v * r.seconds
    out.cpu = {k: v / out.seconds for k, v in out.cpu.items()}
    return out


class Http:
    """Keep-alive HTTP/1.1 connections on raw streams, one request URL each; `get` uses any idle
    one. (httpx would cost the client more CPU per request than the server spends, on the same
    two cores.)"""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self._port = port
        self._extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]] = []

    async def open(self, paths: Sequence[str]) -> None:
        for path in paths:
            reader, writer = await asyncio.open_connection("127.0.0.1", self._port)
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self._port}\r\n{self._extra}\r\n".encode()
            self._idle.append((reader, writer, request))

    async def close(self) -> None:
        for _, writer, _ in self._idle:
            writer.close()
        self._idle = []

    async def get(self) -> tuple[int, dict[bytes, bytes], bytes]:
        """(status, lower-cased headers, body)."""
        conn = self._idle.pop()
        reader, writer, request = conn
        try:
            writer.write(request)
            first = await reader.readline()
            if not first:  # the server closed it while idle (its keep-alive timeout): reconnect once
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", self._port)
                conn = (reader, writer, request)
                writer.write(request)
                first = await reader.readline()
            status = int(first.split(b" ", 2)[1])
            headers: dict[bytes, bytes] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
        finally:
            self._idle.append(conn)
        return status, headers, body


# -- the run -----------------------------------------------------------------------------------


def query_items(seeded: Seeded) -> list[tuple[str, str]]:
    """The dashboard query: the last whole 24 h of the seeded data, hourly, two types."""
    end = seeded.end
    start = end - timedelta(hours=24)
    if start < seeded.start:
        raise SystemExit(f"--rows {seeded.rows} covers less than 24 h; at least {24 * 60 * seeded.rows_per_minute}")
    iso = "%Y-%m-%dT%H:%M:%SZ"
    return [
        ("from", start.strftime(iso)),
        ("to", end.strftime(iso)),
        ("granularity", "hour"),
        ("fields", FIELDS),
        ("filter[type]", TYPES),
    ]


def metric(text: str, name: str, labels: dict[str, str]) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def scrape(port: int) -> str:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(fetch)


async def measure(
    settings: Settings, seeded: Seeded, procs: Processes, *, seconds: float, concurrency: int,
    generic_plans: bool = True, rounds: int = 1,
) -> dict[str, Any]:
    items = query_items(seeded)
    path = f"/v1/rollups/{ROLLUP}?" + urllib.parse.urlencode(items)
    warmup = min(2.0, seconds / 5)
    port = settings.query_port
    phases: dict[str, Phase] = {}

    # (a) cached: the first GET computes and stores the entry; every later one must serve its rows.
    cached = Http(port, {})
    await cached.open([path] * concurrency)
    status, headers, body = await cached.get()
    assert status == 200, body[:500]
    status, headers, hit_body = await cached.get()
    assert (status, headers.get(b"x-cache")) == (200, b"hit"), (status, headers)
    reference = orjson.loads(hit_body)["data"]
    rows = len(reference)
    # A hit's bytes are the stored rendering with per-response fields spliced onto the end of
    # `meta` (query.render.serving): everything before them must be byte for byte the same. A bytes
    # comparison, as the Redis phase's: parsing 5 KB of JSON per response would bill the client's
    # own check to (a)'s latency, not (c)'s.
    stable = hit_body[: hit_body.rindex(b',"query_ms":')]

    async def cached_get() -> None:
        status, headers, body = await cached.get()
        if status != 200 or headers.get(b"x-cache") != b"hit" or not body.startswith(stable):
            raise AssertionError(f"not the cached entry: {status} {headers.get(b'x-cache')!r} {body[:200]!r}")

    # (c) the entry itself: the one query key under this run's prefix (not a lock), holding the body.
    redis = redis_client(str(settings.redis_url))
    try:
        keys = [k async for k in redis.scan_iter(match=f"{settings.cache_prefix}*")]
        entries = [k for k in keys if not k.endswith(b":lock")]
        assert len(entries) == 1, f"expected one cache entry under {settings.cache_prefix!r}, found {keys}"
        key = entries[0]
        stored = await redis.get(key)
        # An entry is a header line, then the rendered body (query.cache_policy.pack).
        assert isinstance(stored, bytes), f"{key!r} holds {stored!r}"
        assert orjson.loads(stored.partition(b"\n")[2])["data"] == reference, f"{key!r} does not hold the rows"

        async def redis_get() -> None:
            if await redis.get(key) != stored:
                raise AssertionError("the cache entry changed during the Redis phase")

        # (a) and (c) alternate in `rounds` rounds, so that each is measured moments from the other.
        await timed(Phase("warmup"), procs, cached_get, seconds=warmup, concurrency=concurrency)
        await timed(Phase("warmup"), procs, redis_get, seconds=warmup, concurrency=concurrency)
        a_rounds, c_rounds = [], []
        for _ in range(rounds):
            a_rounds.append(await timed(Phase("a"), procs, cached_get, seconds=seconds / rounds,
                                        concurrency=concurrency))
            c_rounds.append(await timed(Phase("c"), procs, redis_get, seconds=seconds / rounds,
                                        concurrency=concurrency))
        phases["a_cached"] = merged("a", a_rounds)
        phases["c_redis"] = merged("c", c_rounds)
        phases["c_redis"].extra = {"entry_bytes": len(stored)}
        a = phases["a_cached"]
        a.extra = {"query_cpu_us_per_hit": round(a.cpu["tally-query"] / 100 * 1e6 / a.rate, 1)}
        # A dashboard's usual load: a quarter of what the cached phase saturated at, for both.
        light = a.rate / 4
        phases["a_cached_light"] = await paced(Phase("a_light"), procs, cached_get, seconds=seconds / 2,
                                               rate=light, concurrency=concurrency)
        phases["c_redis_light"] = await paced(Phase("c_light"), procs, redis_get, seconds=seconds / 2,
                                              rate=light, concurrency=concurrency)
        phases["a_cached_light"].extra = {"target_per_s": round(light, 1)}
    finally:
        await redis.aclose()
        await cached.close()

    # (b) uncached: every answer a miss; count the Postgres reads the service made.
    # Identical concurrent misses share one computation (single flight), so each connection asks
    # with its own `limit` (1000, 999, ...: the same 48 rows and the same SQL, another cache key).
    uncached = Http(port, {"Cache-Control": "no-cache"})
    await uncached.open([f"{path}&limit={settings.default_limit - i}" for i in range(concurrency)])

    async def uncached_get() -> None:
        status, headers, body = await uncached.get()
        if status != 200 or headers.get(b"x-cache") != b"miss" or orjson.loads(body)["data"] != reference:
            raise AssertionError(f"not a fresh read: {status} {headers.get(b'x-cache')!r} {body[:200]!r}")

    await timed(Phase("warmup"), procs, uncached_get, seconds=warmup, concurrency=concurrency)
    labels = {"rollup": ROLLUP, "reason": "miss"}
    reads_before = metric(await scrape(port), "tally_query_computations_total", labels)
    b = phases["b_uncached"] = await timed(Phase("b"), procs, uncached_get, seconds=seconds, concurrency=concurrency)
    reads = metric(await scrape(port), "tally_query_computations_total", labels) - reads_before
    await uncached.close()
    assert reads == len(b.latencies), f"{reads:g} Postgres reads for {len(b.latencies)} uncached requests"

    # (d) the planner's statement through an engine built as the service builds its own;
    # (e) the same with Postgres's default plan cache (generic plans allowed).
    rollup = Catalog(settings.rollups).get(ROLLUP)
    limits = Limits(default_limit=settings.default_limit, max_limit=settings.max_limit, max_offset=settings.max_offset)
    q = parse_query(rollup.spec, items, limits, datetime.now(UTC))
    source = rollup.source(q)  # the table the service reads (the hour table, where the rollup keeps one)
    stmt = plan(rollup.spec, source.table, q, stored=source.granularity)
    service_like = read_engine(
        str(settings.postgres_url), pool_size=settings.db_pool_size, statement_timeout_ms=settings.statement_timeout_ms
    )
    generic = create_async_engine(
        asyncpg_url(str(settings.postgres_url)),
        pool_size=settings.db_pool_size,
        max_overflow=0,
        connect_args={
            "server_settings": {
                "statement_timeout": str(settings.statement_timeout_ms),
            }
        },
    )
    engines = [("d_sql", service_like), ("e_sql_generic_plans", generic)]
    if not generic_plans:  # (e) informs docs/query-plans.md; the suite's quick run leaves it out
        await generic.dispose()
        engines.pop()
    for name, engine in engines:
        try:

            async def sql(engine: AsyncEngine = engine) -> None:
                async with engine.connect() as conn:
                    got = (await conn.execute(stmt)).all()
                if len(got) != rows:
                    raise AssertionError(f"the statement returned {len(got)} rows, the API {rows}")

            await timed(Phase("warmup"), procs, sql, seconds=warmup, concurrency=concurrency)
            phases[name] = await timed(Phase(name), procs, sql, seconds=seconds, concurrency=concurrency)
        finally:
            await engine.dispose()

    a, c, d = phases["a_cached"], phases["c_redis"], phases["d_sql"]
    return {
        "benchmark": "query_latency",
        "rows_in_table": seeded.rows,
        "data_from": seeded.start.isoformat(),
        "data_to": seeded.end.isoformat(),
        "query": dict(items),
        "result_rows": rows,
        "body_bytes": len(hit_body),
        "concurrency": concurrency,
        "seconds_per_phase": seconds,
        "rounds_a_c": rounds,
        "cores": os.cpu_count(),
        "sql": str(stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})),
        **{name: p.row() for name, p in phases.items()},
        "ratio_cached_to_redis": {"per_s": round(a.rate / c.rate, 3), "p50": round(a.p50 / c.p50, 2)},
        "ratio_cached_to_redis_light": {
            "per_s": round(phases["a_cached_light"].rate / phases["c_redis_light"].rate, 3),
            "p50": round(phases["a_cached_light"].p50 / phases["c_redis_light"].p50, 2),
            "p99": round(phases["a_cached_light"].percentile(0.99) / phases["c_redis_light"].percentile(0.99), 2),
        },
        "ratio_uncached_to_sql": {"per_s": round(b.rate / d.rate, 3), "p50": round(b.p50 / d.p50, 2)},
    }


def spawn_query(settings: Settings, log: Path, timeout: float = 60.0) -> subprocess.Popen[bytes]:
    """`tally query`, started the way an operator starts it, and waited for until ready."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "core.cli", "query"],
            env=settings.process_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=devstack._die_with_parent,
        )
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            url = f"http://127.0.0.1:{settings.query_port}/readyz"
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"tally query never became ready; see {log}")
        time.sleep(0.05)


def report(row: dict[str, Any]) -> Iterable[str]:
    q = row["query"]
    yield (
        f"agg_events_by_type: {row['rows_in_table']:,} rows, minute buckets {row['data_from']} .. {row['data_to']}; "
        f"{row['cores']} cores shared by everything"
    )
    yield (
        f"query: {q['from']} .. {q['to']} (closed), granularity={q['granularity']}, fields={q['fields']}, "
        f"filter[type]={q['filter[type]']} -> {row['result_rows']} rows, {row['body_bytes']:,} bytes"
    )
    yield f"concurrency {row['concurrency']}, {row['seconds_per_phase']:g} s per phase after a warm-up"
    yield f"{'':50} {'p50 ms':>8} {'p99 ms':>8} {'per s':>8}  {'of limit: per s, p50':>21}  CPU % of a core"
    yield f"{'':50} {'':>8} {'':>8} {'':>8}  {'':>21}  client/query/pg/redis"
    lines: Sequence[tuple[str, str, str]] = (
        ("a_cached", "(a) cached GET (X-Cache: hit)", "ratio_cached_to_redis"),
        ("c_redis", "(c) bare Redis GET of its entry: limit of (a)", ""),
        ("a_cached_light", "(a) at a quarter of its saturated rate", "ratio_cached_to_redis_light"),
        ("c_redis_light", "(c) at the same rate: limit of the line above", ""),
        ("b_uncached", "(b) uncached GET (no-cache, X-Cache: miss)", "ratio_uncached_to_sql"),
        ("d_sql", "(d) bare SQL, planner's statement: limit of (b)", ""),
        ("e_sql_generic_plans", "(e) (d) with plan_cache_mode=auto (PG default)", ""),
    )
    for key, label, ratio in lines:
        if key not in row:
            continue
        p = row[key]
        cpu = p["cpu_percent_of_one_core"]
        r = row[ratio] if ratio else None
        shown = f"{r['per_s']:.3f}, {r['p50']:.2f}x" if r else ""
        yield (
            f"{label:50} {p['p50_ms']:8.2f} {p['p99_ms']:8.2f} {p['per_s']:8,.0f}  {shown:>21}  "
            f"{cpu['client']:>3}/{cpu['tally-query']:>3}/{cpu['postgres']:>3}/{cpu['redis']:>3}"
        )
    yield f"(a): the query process's CPU per cache hit {row['a_cached']['query_cpu_us_per_hit']:,.0f} µs"
    e = row.get("e_sql_generic_plans")
    yield (
        f"(b): {row['b_uncached']['operations']:,} requests, as many Postgres reads (the service's /metrics)"
        + (f"; (e) runs at {e['per_s'] / row['d_sql']['per_s']:.3f} of (d)'s rate" if e else "")
    )


def run(*, rows: int = 7 * 24 * 60 * 150, seconds: float = 10.0, concurrency: int = 8, generic_plans: bool = True,
        rounds: int = 1, tmp: Path | None = None) -> dict[str, Any]:
    """Embedded servers, `rows` seeded rows, one `tally query`; the figures."""
    tmp = tmp or Path(tempfile.mkdtemp(prefix="tally-qlat-"))
    servers = [
        devstack.kafka(devstack.free_port()).start(),
        devstack.postgres(tmp / "pg" / "data", devstack.free_port(), durable=False).start(),
        devstack.redis(devstack.free_port()).start(),
    ]
    settings = Settings(
        env="test",
        drain_seconds=0,  # no balancer to drain from: stop at once
        kafka_bootstrap=servers[0].url,
        postgres_url=servers[1].url,
        redis_url=servers[2].url,
        query_port=devstack.free_port(),
        cache_prefix="bench-qlat:",
        log_level="warning",
        auth=False,  # the bench measures queries, not key checks
    )
    proc: subprocess.Popen[bytes] | None = None
    try:
        asyncio.run(migrate(settings))
        started = time.perf_counter()
        seeded = asyncio.run(seed_rollup(str(settings.postgres_url), rows))
        seed_seconds = time.perf_counter() - started
        proc = spawn_query(settings, tmp / "query.log")
        pids = [s.process.pid for s in servers[1:] if s.process is not None]
        procs = Processes(query=proc.pid, postgres=pids[0], redis=pids[1])
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            row = runner.run(measure(settings, seeded, procs, seconds=seconds, concurrency=concurrency,
                                     generic_plans=generic_plans, rounds=rounds))
        row["seed_seconds"] = round(seed_seconds, 1)
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        for s in reversed(servers):
            s.stop()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=7 * 24 * 60 * 150, help="rollup rows to seed (default 7 days)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="alternations of (a) and (c) within --seconds")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    row = run(rows=args.rows, seconds=args.seconds, concurrency=args.concurrency, rounds=args.rounds)
    for line in report(row):
        print(line)
    print(f"(seeded in {row['seed_seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
