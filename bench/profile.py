"""Profile `tally ingest` under the ingest benchmark's load, or `tally consume` applying a topic of
the consumer benchmark's shapes: a flame graph and a table of shares.

    .venv/bin/python -m bench.profile [--seconds 20] [--batch 100] [--connections 16] [--out build]
    .venv/bin/python -m bench.profile --consumer live|spread [--events 600000] [--out build]

With --consumer it starts an embedded broker and Postgres, fills a topic with the shape's events
(bench.consumer_throughput), starts one `tally consume` and samples it with py-spy until it has
applied the whole topic; files are `build/consumer-<shape>-profile.{svg,txt}`.

It starts an embedded broker and Valkey, one `tally ingest --workers 1` (auth off, the rate
limiter on, as the benchmark runs it), drives it with `bench.loadgen` and samples the worker
with py-spy (250 Hz). It writes `build/ingest-profile.svg` (the flame graph; callers below
callees) and `build/ingest-profile.txt` (py-spy's raw collapsed stacks), and prints the modules
and lines that hold the most samples as the innermost frame, beside the request rate and CPU
per request of the run.
py-spy needs ptrace: root, or `kernel.yama.ptrace_scope=0`. `make profile` runs this.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.ingest_throughput import make_bodies, start_server, stop_server
from bench.loadgen import run_load
from bench.procs import cpu_seconds
from core import devstack
from core.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def _module(frame: str) -> str:
    """`fn (path/to/site-packages/pkg/mod.py:12)` -> `pkg/mod.py`; Tally's own files keep their path."""
    path = frame[frame.rfind("(") + 1 :].rsplit(":", 1)[0]
    path = path.split("site-packages/")[-1]
    return "/".join(path.split("/")[-2:])


def shares(collapsed: Path, top: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The functions (at the line sampled) and the modules that the samples were in, innermost
    frame only ("self" time), as shares of all samples: what to make cheaper, not who called it."""
    by_frame: collections.Counter[str] = collections.Counter()
    by_module: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        leaf = stack.rsplit(";", 1)[-1]
        by_frame[leaf] += n
        by_module[_module(leaf)] += n
    if not total:
        return [], []
    return ([(f, n / total) for f, n in by_frame.most_common(top)],
            [(m, n / total) for m, n in by_module.most_common(top)])


async def _consume_profiled(py_spy: str, shape: str, events: int, rate: int, out: Path) -> tuple[Path, Path, str]:
    """Fill a topic, run one consumer over it under py-spy; (raw stacks, flame graph, a summary line)."""
    import asyncpg

    from bench import consumer_throughput as ct

    tmp = Path(tempfile.mkdtemp(prefix="tally-profile-"))
    broker = devstack.kafka(devstack.free_port()).start()
    postgres = devstack.postgres(tmp / "pg" / "data", devstack.free_port(), durable=True).start()
    raw, svg = out / f"consumer-{shape}-profile.txt", out / f"consumer-{shape}-profile.svg"
    try:
        await ct.wait_for_postgres(postgres.url)
        base = Settings(env="test", kafka_bootstrap=broker.url, postgres_url=postgres.url, drain_seconds=0,
                        topic_partitions=ct.PARTITIONS, auth=False, log_level="warning")
        topic = await ct.make_topic(base, shape, events, 100)
        async with ct.fresh_database(postgres.url) as url:
            settings = topic.settings.model_copy(update={"postgres_url": url, "consumer_group": "profile"})
            await ct.migrate_database(settings)
            procs, _ = await ct.start_consumers(settings, 1, tmp / "consume.log")
            spy = [py_spy, "record", "--pid", str(procs[0].pid), "--rate", str(rate), "--nonblocking"]
            recorders = [await asyncio.create_subprocess_exec(*spy, "--format", fmt, "--output", str(path),
                                                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                         for fmt, path in (("raw", raw), ("flamegraph", svg))]
            conn = await asyncpg.connect(url)
            started = time.monotonic()
            cpu_before = cpu_seconds(procs[0].pid)
            try:
                total = sum(topic.ends.values())
                while True:
                    if int(await conn.fetchval("SELECT coalesce(sum(next_offset), 0) FROM tally_offsets")) >= total:
                        break
                    await asyncio.sleep(0.05)
                cpu, wall = cpu_seconds(procs[0].pid) - cpu_before, time.monotonic() - started
            finally:
                await conn.close()
                procs[0].terminate()
                await procs[0].wait()
                for recorder in recorders:
                    await asyncio.wait_for(recorder.wait(), 60)
    finally:
        broker.stop()
        postgres.stop()
    line = (f"{topic.events:,} {shape} events applied in {wall:.1f} s (group join included): "
            f"{topic.events / wall:,.0f} ev/s, consumer {100 * cpu / wall:.0f} % of a core, "
            f"{1e6 * cpu / topic.events:.2f} µs CPU per event (sampling included)")
    return raw, svg, line


def _print_shares(raw: Path, top: int) -> None:
    frames, modules = shares(raw, top)
    print("share of samples by module (own time):")
    for module, share in modules:
        print(f"  {100 * share:5.1f} %  {module}")
    print("\nshare of samples by function and line (own time):")
    for frame, share in frames:
        print(f"  {100 * share:5.1f} %  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--consumer", choices=["live", "spread"], help="profile `tally consume` on this shape")
    parser.add_argument("--events", type=int, default=600_000, help="with --consumer: events in the topic")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "build")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy (make profile does)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.consumer:
        raw, svg, line = asyncio.run(_consume_profiled(py_spy, args.consumer, args.events, args.rate, args.out))
        print(f"{line}\nflame graph: {svg}\nraw stacks: {raw}\n")
        _print_shares(raw, args.top)
        return
    tmp = Path(tempfile.mkdtemp(prefix="tally-profile-"))
    kafka = devstack.kafka(devstack.free_port()).start()
    redis = devstack.redis(devstack.free_port()).start()
    settings = Settings(env="test", kafka_bootstrap=kafka.url, redis_url=redis.url, topic="profile.events",
                        drain_seconds=0, topic_partitions=6, auth=False, log_level="warning",
                        rate_limit_events_per_second=100_000_000)
    port = devstack.free_port()
    server = start_server("tally", 1, settings, port, tmp / "server.log")
    try:
        bodies = make_bodies(args.batch)
        run_load("127.0.0.1", port, "/v1/events", bodies, seconds=2, warmup=1, connections=args.connections)
        raw = args.out / "ingest-profile.txt"
        svg = args.out / "ingest-profile.svg"
        spy = [py_spy, "record", "--pid", str(server.pid), "--rate", str(args.rate),
               "--duration", str(int(args.seconds)), "--nonblocking"]
        recorders = [subprocess.Popen([*spy, "--format", fmt, "--output", str(path)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for fmt, path in (("raw", raw), ("flamegraph", svg))]
        cpu_before = cpu_seconds(server.pid)
        started = time.monotonic()
        load = run_load("127.0.0.1", port, "/v1/events", bodies, seconds=args.seconds, warmup=0,
                        connections=args.connections)
        cpu = cpu_seconds(server.pid) - cpu_before
        wall = time.monotonic() - started
        for recorder in recorders:
            recorder.wait(60)
    finally:
        stop_server(server)
        kafka.stop()
        redis.stop()
    rate = load.ok(202) / load.seconds
    print(f"{load.ok(202)} requests of {args.batch} events in {load.seconds:.1f} s: {rate:,.0f} req/s, "
          f"server {100 * cpu / wall:.0f} % of a core, {1e6 * cpu / max(load.ok(202), 1):,.0f} µs CPU per request "
          f"({1e6 * cpu / max(load.ok(202) * args.batch, 1):.2f} µs per event, sampling included)")
    print(f"flame graph: {svg}\nraw stacks: {raw}\n")
    _print_shares(raw, args.top)


if __name__ == "__main__":
    main()
