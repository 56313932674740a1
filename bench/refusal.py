"""Time to refuse when saturated: a stalled broker (SIGSTOP) holds the in-flight budget,
and every further batch must get its 503 at once. Printed beside a `/healthz` round
trip on the same server, the floor of any answer, taken alternately with the refusals.

    .venv/bin/python -m bench.refusal [--requests 500] [--json out.json]

`run()` returns the figures, for bench.suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from core import devstack
from core.kafka import ensure_topics
from core.settings import Settings


def pct(data: list[float], p: float) -> float:
    data = sorted(data)
    return data[min(len(data) - 1, int(len(data) * p))] * 1000


async def measure(port: int, kafka: devstack.EmbeddedServer, n: int) -> tuple[list[float], list[float], int]:
    """`n` refusals and `n` /healthz round trips, alternately, while the broker is stopped: each
    refusal is measured beside the floor of any answer a moment apart."""
    batch = {"events": [{"type": "r", "properties": {"pad": "x" * 100}}] * 100}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        for _ in range(20):
            await http.post("/v1/events", json=batch)
            await http.get("/healthz")
        assert kafka.process is not None
        kafka.process.send_signal(signal.SIGSTOP)
        try:
            stuck = asyncio.create_task(http.post("/v1/events", json=batch))
            await asyncio.sleep(0.3)
            refusals, health, statuses = [], [], set()
            for _ in range(n):
                t = time.perf_counter()
                await http.get("/healthz")
                health.append(time.perf_counter() - t)
                t = time.perf_counter()
                r = await http.post("/v1/events", json=batch)
                refusals.append(time.perf_counter() - t)
                statuses.add(r.status_code)
        finally:
            kafka.process.send_signal(signal.SIGCONT)
        await stuck  # the broker is back: the held batch completes (no waiting out the produce timeout)
    assert statuses == {503}, statuses
    return refusals, health, len(refusals)


def run(*, requests: int = 500) -> dict[str, Any]:
    """A broker, Redis and one `tally ingest`; the refusal and /healthz figures."""
    kafka = devstack.kafka(devstack.free_port()).start()
    redis = devstack.redis(devstack.free_port()).start()
    port = devstack.free_port()
    settings = Settings(env="test", kafka_bootstrap=kafka.url, redis_url=redis.url, ingest_port=port, auth=False,
                        drain_seconds=0,
                        max_inflight_bytes=1, produce_timeout_seconds=30, topic="bench.refusal", log_level="warning")
    server = None
    try:
        asyncio.run(ensure_topics(settings, [settings.topic]))
        env = settings.process_env()
        server = subprocess.Popen([sys.executable, "-m", "core.cli", "ingest"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  preexec_fn=devstack._die_with_parent)
        devstack.wait_for_port(port, 30, server)
        refusals, health, n = asyncio.run(measure(port, kafka, requests))
    finally:
        if server:
            server.terminate()
            server.wait()
        kafka.stop()
        redis.stop()
    return {"benchmark": "refusal", "requests": n, "cores": os.cpu_count(),
            "refusal_p50_ms": round(pct(refusals, 0.5), 3), "refusal_p99_ms": round(pct(refusals, 0.99), 3),
            "healthz_p50_ms": round(pct(health, 0.5), 3), "healthz_p99_ms": round(pct(health, 0.99), 3)}


def report(row: dict[str, Any]) -> list[str]:
    return [
        f"refusal when saturated (100-event batches, {row['requests']} requests): p50 {row['refusal_p50_ms']:.2f} ms, "
        f"p99 {row['refusal_p99_ms']:.2f} ms",
        f"/healthz round trip on the same server:                  p50 {row['healthz_p50_ms']:.2f} ms, "
        f"p99 {row['healthz_p99_ms']:.2f} ms",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    row = run(requests=args.requests)
    for line in report(row):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
