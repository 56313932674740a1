"""End-to-end freshness: delay from ingest's 202 to the event being visible through
the query API, under a steady background load, beside the floor measured in the same
run (one ingest round trip plus one uncached query round trip on an idle stack).

    .venv/bin/python -m bench.freshness [--rate 2000] [--probes 40]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from core import devstack
from core.demo import demo_event
from core.migrate import migrate
from core.settings import Settings

NO_CACHE = {"cache-control": "no-cache"}


def spawn(command: str, settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    env = settings.process_env()
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "core.cli", command], env=env, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=devstack._die_with_parent)


async def background_load(ingest: httpx.AsyncClient, rate: int, stop: asyncio.Event) -> int:
    rng, sent, batch = random.Random(3), 0, 100
    interval = batch / rate
    while not stop.is_set():
        started = time.monotonic()
        now = int(time.time() * 1000)
        r = await ingest.post("/v1/events", json=[demo_event(rng, now) for _ in range(batch)])
        sent += r.json().get("accepted", 0) if r.status_code == 202 else 0
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
    return sent


async def probe(ingest: httpx.AsyncClient, query: httpx.AsyncClient, n: int) -> tuple[float, float]:
    """(delay from 202 to visible, the ingest round trip) for one probe event."""
    etype = f"probe_{n}_{random.randrange(1 << 30)}"
    t0 = time.perf_counter()
    r = await ingest.post("/v1/events", json=[{"type": etype}])
    assert r.status_code == 202, r.text
    acked = time.perf_counter()
    params = {"fields": "count", "filter[type]": etype, "from": "-10m", "to": "+10m"}
    while True:
        data = (await query.get("/v1/rollups/events_by_type", params=params, headers=NO_CACHE)).json()["data"]
        if data and data[0]["count"] == 1:
            return time.perf_counter() - acked, acked - t0
        await asyncio.sleep(0.005)


async def measure(settings: Settings, rate: int, probes: int) -> dict[str, float]:
    base_i = f"http://127.0.0.1:{settings.ingest_port}"
    base_q = f"http://127.0.0.1:{settings.query_port}"
    async with httpx.AsyncClient(base_url=base_i, timeout=30) as ingest, \
            httpx.AsyncClient(base_url=base_q, timeout=30) as query:
        params = {"fields": "count", "filter[type]": "none", "from": "-10m", "to": "+10m"}
        floor_samples = []
        for _ in range(20):  # the floor: one ingest and one uncached query round trip, idle
            t0 = time.perf_counter()
            await ingest.post("/v1/events", json=[{"type": "warmup"}])
            await query.get("/v1/rollups/events_by_type", params=params, headers=NO_CACHE)
            floor_samples.append(time.perf_counter() - t0)
        stop = asyncio.Event()
        load = asyncio.create_task(background_load(ingest, rate, stop))
        await asyncio.sleep(2)
        started = time.monotonic()
        delays = []
        for n in range(probes):
            delay, _ = await probe(ingest, query, n)
            delays.append(delay)
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        stop.set()
        sent = await load
    delays.sort()
    return {
        "target_rate": rate,
        "background_events_per_s": round(sent / (elapsed + 2)),
        "p50_ms": round(statistics.median(delays) * 1000, 1),
        "p99_ms": round(delays[min(len(delays) - 1, int(len(delays) * 0.99))] * 1000, 1),
        "floor_ms": round(statistics.median(floor_samples) * 1000, 1),
        "batch_max_wait_ms": settings.batch_max_wait_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--probes", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tally-fresh-"))
    servers = [devstack.kafka(devstack.free_port()).start(),
               devstack.postgres(tmp / "pg" / "data", devstack.free_port(), durable=False).start(),
               devstack.redis(devstack.free_port()).start()]
    settings = Settings(env="test", kafka_bootstrap=servers[0].url, postgres_url=servers[1].url,
                        redis_url=servers[2].url, ingest_port=devstack.free_port(),
                        query_port=devstack.free_port(), consumer_metrics_port=devstack.free_port(),
                        auth=False)  # the bench measures the pipeline, not key checks
    procs: list[subprocess.Popen[bytes]] = []
    try:
        asyncio.run(migrate(settings))
        for command, port in (("ingest", settings.ingest_port), ("query", settings.query_port),
                              ("consume", settings.consumer_metrics_port)):
            procs.append(spawn(command, settings, tmp / f"{command}.log"))
            devstack.wait_for_port(port, 60, procs[-1])
        time.sleep(3)  # the consumer joins its group
        row = asyncio.run(measure(settings, args.rate, args.probes))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(15)
        for s in reversed(servers):
            s.stop()
    print(f"freshness (202 -> visible via query API): p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms "
          f"at {row['background_events_per_s']} events/s background (target {args.rate})")
    print(f"floor (idle ingest + uncached query round trip): {row['floor_ms']} ms; "
          f"consumer poll wait {row['batch_max_wait_ms']} ms")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
