"""Ingest events/s through HTTP, beside a bare aiokafka producer sending the same
events (same envelopes, acks=all) to the same broker, in the same run.

    .venv/bin/python -m bench.ingest_throughput [--seconds 10] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from bench.loadgen import run_load
from core import devstack
from core.kafka import ensure_topics
from core.settings import Settings
from schemas import envelope
from schemas.events import normalize_event


def make_bodies(batch: int, count: int = 50) -> list[bytes]:
    from core.demo import demo_event

    rng = random.Random(1)
    now = int(time.time() * 1000)
    return [orjson.dumps({"events": [demo_event(rng, now) for _ in range(batch)]}) for _ in range(count)]


def _load_process(port: int, bodies: list[bytes], seconds: float, connections: int, out: mp.Queue) -> None:  # type: ignore[type-arg]
    result = asyncio.run(run_load("127.0.0.1", port, "/v1/events", bodies, seconds=seconds, connections=connections))
    out.put((result.requests, result.statuses, result.percentile(0.5), result.percentile(0.99), result.seconds))


async def raw_producer_rate(settings: Settings, bodies: list[bytes], seconds: float) -> float:
    """Events/s of a bare producer: the same normalized envelopes, acks=all, several sends in flight."""
    now = int(time.time() * 1000)
    values = []
    counts = []
    for body in bodies:
        events = orjson.loads(body)["events"]
        encoded = []
        for e in events:
            with contextlib.suppress(ValueError):
                encoded.append(normalize_event(e, now, settings.event_limits))
        values.extend(envelope.pack(encoded, settings.envelope_max_bytes))
        counts.append(len(encoded))
    per_value = sum(counts) / len(values)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=2,
                                max_request_size=2 * 1024 * 1024)
    await producer.start()
    sent = 0
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            futures = [await producer.send(settings.topic, v) for v in values[:32]]
            await asyncio.gather(*futures)
            values = values[32:] + values[:32]
            sent += len(futures)
    finally:
        await producer.stop()
    return sent * per_value / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    kafka = devstack.kafka(devstack.free_port()).start()
    tmp = Path(tempfile.mkdtemp(prefix="tally-bench-"))
    port = devstack.free_port()
    redis = devstack.redis(devstack.free_port()).start()
    # No key store in this bench (auth off); the rate limiter still runs (one Redis call per
    # request, as in production) with a limit high enough not to refuse anything.
    settings = Settings(env="test", kafka_bootstrap=kafka.url, redis_url=redis.url, topic="bench.events",
                        ingest_port=port, topic_partitions=6, auth=False,
                        rate_limit_events_per_second=int(os.environ.get("BENCH_RATE", "100000000")))
    try:
        asyncio.run(ensure_topics(settings, [settings.topic]))
        bodies = make_bodies(args.batch)
        env = settings.process_env()
        log = (tmp / "ingest.log").open("wb")
        import subprocess

        server = subprocess.Popen([sys.executable, "-m", "core.cli", "ingest", "--workers", str(args.workers)],
                                  env=env, stdout=log,
                                  stderr=subprocess.STDOUT, preexec_fn=devstack._die_with_parent)
        devstack.wait_for_port(port, 30, server)
        try:
            queue: mp.Queue = mp.Queue()  # type: ignore[type-arg]
            loader = mp.Process(target=_load_process, args=(port, bodies, args.seconds, args.connections, queue))
            loader.start()
            _requests, statuses, p50, p99, secs = queue.get()
            loader.join()
        finally:
            server.terminate()
            server.wait()
        accepted_per_request = sum(1 for b in bodies for e in orjson.loads(b)["events"]
                                   if e["type"] != "not a valid type!") / len(bodies)
        ok = statuses.get(202, 0)
        http_rate = ok * accepted_per_request / secs
        raw_rate = asyncio.run(raw_producer_rate(settings, bodies, args.seconds))
    finally:
        kafka.stop()
        redis.stop()
    row = {
        "benchmark": "ingest", "events_per_request": args.batch, "connections": args.connections,
        "workers": args.workers, "http_events_per_s": round(http_rate), "requests_per_s": round(ok / secs),
        "p50_ms": round(p50 * 1000, 2), "p99_ms": round(p99 * 1000, 2), "statuses": statuses,
        "raw_producer_events_per_s": round(raw_rate), "ratio": round(http_rate / raw_rate, 3),
        "cores": os.cpu_count(),
    }
    print(f"ingest over HTTP: {row['http_events_per_s']:>9,} events/s  ({row['requests_per_s']} req/s, "
          f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, {args.batch} events/request, "
          f"{args.connections} connections, {args.workers} worker(s), statuses {statuses})")
    print(f"bare producer:    {row['raw_producer_events_per_s']:>9,} events/s  (same envelopes, acks=all)")
    print(f"ratio:            {row['ratio']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
