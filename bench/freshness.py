"""End-to-end freshness: delay from ingest's 202 to the event being visible through
the query API, under a steady background load, beside the floor measured in the same
run (one ingest round trip plus one uncached query round trip on an idle stack).

    .venv/bin/python -m bench.freshness [--rate 2000] [--probes 200] [--ingest-workers 1]

The background load is bench.loadgen, open loop (each request on its schedule), from its own
process; the probes (one event each, every 50 ms, of its own type) are sent from this process,
which polls the query API every 5 ms for all the probes still awaited at once: first uncached
(no-cache, a filter naming the awaited types), then as a cached dashboard does (the same query
string every time: counts by type over the last 10 minutes, through the Redis cache, which
follows the consumer's commits by rollup version).
`run()` returns the figures and every process's peak RSS (ingest, query, consumer, broker,
Postgres, Redis) at the end, for bench.suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import Load
from bench.procs import peak_rss
from core import devstack
from core.migrate import migrate
from core.settings import Settings

NO_CACHE = {"cache-control": "no-cache"}
BATCH = 100  # events per background request
LOAD_CONNECTIONS = 8


def spawn(command: str, settings: Settings, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = settings.process_env()
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "core.cli", command, *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=devstack._die_with_parent)


def background_bodies(count: int = 50) -> list[bytes]:
    from bench.ingest_throughput import make_bodies

    return make_bodies(BATCH, count)


class Probes:
    """Probe events, one every `interval` seconds, each of its own type; one poller asks the
    query API (no-cache) for the counts of every type still awaited, every 5 ms, and records
    each probe's delay from its 202 to the poll that first counts it. Probes overlap (a few are
    in flight at once), so hundreds fit in seconds without adding query load: one poll covers
    them all, as one poll covered the single probe before."""

    def __init__(
        self, ingest: httpx.AsyncClient, query: httpx.AsyncClient, count: int, interval: float, *, cached: bool = False
    ) -> None:
        self._ingest, self._query = ingest, query
        self._count, self._interval = count, interval
        self._cached = cached
        self.outcomes: dict[str, int] = {}  # X-Cache of every poll
        self._tag = f"p{random.randrange(1 << 30):x}_"
        self._acked: dict[str, float] = {}  # awaited: type -> when its 202 arrived
        self.delays: list[float] = []
        self.posts: list[float] = []  # the probes' own ingest round trips

    async def _send(self) -> None:
        start = time.perf_counter()
        for n in range(self._count):
            await asyncio.sleep(max(0.0, start + n * self._interval - time.perf_counter()))
            etype = f"{self._tag}{n}"
            t0 = time.perf_counter()
            r = await self._ingest.post("/v1/events", json=[{"type": etype}])
            assert r.status_code == 202, r.text
            self._acked[etype] = time.perf_counter()
            self.posts.append(self._acked[etype] - t0)

    async def _poll(self, sender: asyncio.Task[None]) -> None:
        while not (sender.done() and not self._acked):
            if sender.done() and sender.exception():
                raise sender.exception()  # type: ignore[misc]
            awaited = list(self._acked)
            if awaited:
                if self._cached:  # a dashboard: one query string, answered from the cache
                    params = {"fields": "type,count", "from": "-10m", "to": "+10m", "limit": "10000"}
                    r = await self._query.get("/v1/rollups/events_by_type", params=params)
                else:
                    params = {"fields": "type,count", "filter[type]": ",".join(awaited), "from": "-10m",
                              "to": "+10m", "limit": str(len(awaited))}
                    r = await self._query.get("/v1/rollups/events_by_type", params=params, headers=NO_CACHE)
                assert r.status_code == 200, r.text
                outcome = r.headers.get("x-cache", "?")
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
                seen = time.perf_counter()
                for item in r.json()["data"]:
                    if item["count"] >= 1 and item["type"] in self._acked:
                        self.delays.append(seen - self._acked.pop(item["type"]))
            await asyncio.sleep(0.005)

    async def run(self) -> list[float]:
        sender = asyncio.create_task(self._send())
        await self._poll(sender)
        await sender
        return sorted(self.delays)


async def measure(settings: Settings, rate: int, probes: int, *, lead: float = 2.0,
                  interval: float = 0.05) -> dict[str, Any]:
    base_i = f"http://127.0.0.1:{settings.ingest_port}"
    base_q = f"http://127.0.0.1:{settings.query_port}"
    bodies = background_bodies()
    async with httpx.AsyncClient(base_url=base_i, timeout=30) as ingest, \
            httpx.AsyncClient(base_url=base_q, timeout=30) as query:

        async def floor(n: int) -> list[float]:
            """One ingest and one uncached query round trip on the idle stack, `n` times."""
            params = {"fields": "count", "filter[type]": "none", "from": "-10m", "to": "+10m"}
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                await ingest.post("/v1/events", json=[{"type": "warmup"}])
                await query.get("/v1/rollups/events_by_type", params=params, headers=NO_CACHE)
                samples.append(time.perf_counter() - t0)
            return samples

        await floor(20)  # warm-up: pools, caches, the first plans
        floor_samples = await floor(60)
        # The background: `rate` events/s in batches of BATCH, open loop (on schedule whatever the
        # answers take), from bench.loadgen's own process; runs until the probes are done.
        load = Load("127.0.0.1", settings.ingest_port, "/v1/events", bodies, seconds=3600, warmup=lead,
                    connections=LOAD_CONNECTIONS, paced=rate / BATCH, processes=1)
        try:
            await asyncio.sleep(lead)
            delays = await Probes(ingest, query, probes, interval).run()
            dashboard = Probes(ingest, query, probes, interval, cached=True)
            cached_delays = await dashboard.run()
        finally:
            load.stop()
            background = await asyncio.to_thread(load.result)
        # The floor again once the load has stopped and the consumer caught up: the median of both
        # sets, so that it is not one moment's reading on a machine whose speed drifts.
        await asyncio.sleep(0.5)
        floor_samples += await floor(60)
    errors = {k: v for k, v in background.statuses.items() if k != 202}
    if errors:
        raise RuntimeError(f"the background load was refused: {background.statuses}")
    return {
        "target_rate": rate,
        "background_events_per_s": round(background.ok(202) * BATCH / background.seconds),
        "background_p99_ms": round(background.percentile(0.99) * 1000, 1),
        "background_late_sends": background.late,
        "loadgen_cpu_percent": round(background.cpu_percent),
        "probes": probes,
        "p50_ms": round(statistics.median(delays) * 1000, 1),
        "p99_ms": round(delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000, 1),
        "max_ms": round(delays[-1] * 1000, 1),
        "floor_ms": round(statistics.median(floor_samples) * 1000, 1),
        "batch_max_wait_ms": settings.batch_max_wait_ms,
        "cached_p50_ms": round(statistics.median(cached_delays) * 1000, 1),
        "cached_p99_ms": round(cached_delays[min(len(cached_delays) - 1, int(len(cached_delays) * 0.99))] * 1000, 1),
        "cached_max_ms": round(cached_delays[-1] * 1000, 1),
        "cached_outcomes": dashboard.outcomes,
        "cache_refresh_seconds": settings.cache_refresh_seconds,
    }


def run(*, rate: int = 10_000, probes: int = 200, ingest_workers: int = 1, tmp: Path | None = None) -> dict[str, Any]:
    """The whole pipeline on embedded servers; the figures, and every process's peak RSS."""
    tmp = tmp or Path(tempfile.mkdtemp(prefix="tally-fresh-"))
    servers = [devstack.kafka(devstack.free_port()).start(),
               devstack.postgres(tmp / "pg" / "data", devstack.free_port(), durable=False).start(),
               devstack.redis(devstack.free_port()).start()]
    settings = Settings(env="test", kafka_bootstrap=servers[0].url, postgres_url=servers[1].url, drain_seconds=0,
                        redis_url=servers[2].url, ingest_port=devstack.free_port(),
                        query_port=devstack.free_port(), consumer_metrics_port=devstack.free_port(),
                        auth=False, log_level="warning",  # the bench measures the pipeline, not key checks
                        rate_limit_events_per_second=0)  # nor the limiter: 100k ev/s is its default limit
    procs: dict[str, subprocess.Popen[bytes]] = {}
    memory: list[dict[str, Any]] = []
    try:
        asyncio.run(migrate(settings))
        for command, port in (("ingest", settings.ingest_port), ("query", settings.query_port),
                              ("consume", settings.consumer_metrics_port)):
            workers = ("--workers", str(ingest_workers)) if command == "ingest" and ingest_workers > 1 else ()
            procs[command] = spawn(command, settings, tmp / f"{command}.log", *workers)
            devstack.wait_for_port(port, 60, procs[command])
        time.sleep(3)  # the consumer joins its group
        row = asyncio.run(measure(settings, rate, probes))
        for name, proc in procs.items():
            memory.extend(peak_rss(proc.pid, label=name))
        for name, server in zip(("broker", "postgres", "redis"), servers, strict=True):
            assert server.process is not None
            memory.extend(peak_rss(server.process.pid, label=name))
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(15)
        for s in reversed(servers):
            s.stop()
    return {"benchmark": "freshness", "cores": os.cpu_count(), "ingest_workers": ingest_workers, **row,
            "memory": memory}


def report(row: dict[str, Any]) -> list[str]:
    return [
        f"freshness (202 -> visible via query API): p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms "
        f"({row['probes']} probes) at {row['background_events_per_s']} events/s background, "
        f"{row.get('ingest_workers', 1)} ingest worker(s) (target "
        f"{row['target_rate']}; its p99 {row['background_p99_ms']} ms; load generator {row['loadgen_cpu_percent']}% "
        "of a core)",
        f"floor (idle ingest + uncached query round trip): {row['floor_ms']} ms; "
        f"consumer poll wait {row['batch_max_wait_ms']} ms",
        f"freshness through the cache (202 -> visible in a cached dashboard query): p50 {row['cached_p50_ms']} ms, "
        f"p99 {row['cached_p99_ms']} ms, max {row['cached_max_ms']} ms; polls answered "
        + ", ".join(f"{k} {v}" for k, v in sorted(row["cached_outcomes"].items()))
        + f" (refreshed at most every {row['cache_refresh_seconds']} s; target p99 < 1000 ms)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--ingest-workers", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    row = run(rate=args.rate, probes=args.probes, ingest_workers=args.ingest_workers)
    for line in report(row):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
