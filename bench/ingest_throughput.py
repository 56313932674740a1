"""Ingest events/s through `POST /v1/events`, each figure beside its limits measured in the
same run, on the same broker:

- a bare aiokafka producer sending the same events (the same normalized envelopes, acks=all,
  32 sends in flight) to the same broker: what Kafka and the client library allow;
- the no-op endpoint (bench.noop_app): the same server stack and worker count, receiving the
  same bodies and answering 202 without work: what the HTTP stack allows;
- the straightforward endpoint (bench.naive_app): a pydantic model of the batch and one Kafka
  record per event (acks=all): what the first obvious implementation does.

    .venv/bin/python -m bench.ingest_throughput [--workers 1 2] [--batch 100 1000] [--seconds 10]
        [--connections 16] [--sweep 1 4 16 64] [--compression none gzip lz4 zstd snappy] [--json out.json]
        [--server uvicorn|granian]

Every server kind runs on the same HTTP server (`--server`, default Tally's: core.servers).
Every server gets the same bodies (demo events, all valid), from bench.loadgen in its own
process(es) (closed loop, keep-alive); the load generator's CPU and the server's are printed
beside each phase. Tally runs as `tally ingest --workers N` with auth off and the rate limiter
on (one Redis call per request, as in production). Peak RSS (VmHWM) of every process (each
server's supervisor and workers, the broker, Redis) is read at the end of its last phase.

`--compression`: one Tally server per codec (TALLY_KAFKA_COMPRESSION), each writing a topic of
its own, all loaded in turn within every round (the codec order rotates from round to round), so
each codec's events/s is printed beside the first codec's (`none` first) measured moments apart.
Beside it, the bytes on the wire per event: the record batches the broker stores for that codec
(as produced, compressed; read back from the topic's batch headers) over the events they hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.fetch import FetchRequest

from bench.loadgen import LoadResult, run_load
from bench.procs import peak_rss, tree
from core import devstack
from core.kafka import ensure_topics
from core.servers import DEFAULT_SERVER, SERVERS
from core.settings import Settings
from schemas import envelope
from schemas.events import InvalidEvent, normalize_event

KINDS = ("tally", "noop", "naive")
CODECS = ("none", "gzip", "lz4", "zstd", "snappy")
LABELS = {"tally": "Tally ingest", "noop": "no-op endpoint", "naive": "straightforward endpoint"}
REPO = Path(__file__).resolve().parent.parent


def make_bodies(batch: int, count: int = 50) -> list[bytes]:
    """`count` bodies of `batch` demo events, every one valid (so every server accepts them all)."""
    from core.demo import demo_event

    rng = random.Random(1)
    now = int(time.time() * 1000)
    limits = Settings(env="test").event_limits
    bodies = []
    for _ in range(count):
        events: list[dict[str, Any]] = []
        while len(events) < batch:
            event = demo_event(rng, now)
            with contextlib.suppress(InvalidEvent):
                normalize_event(dict(event), now, limits)
                events.append(event)
        bodies.append(orjson.dumps({"events": events}))
    return bodies


def envelopes_per_body(settings: Settings, bodies: list[bytes]) -> float:
    """Kafka records (envelopes) Tally makes of one body, on average: one unless its events
    exceed the envelope bound. Turns stored records into events."""
    now = int(time.time() * 1000)
    count = 0
    for body in bodies:
        encoded = [normalize_event(e, now, settings.event_limits) for e in orjson.loads(body)["events"]]
        count += sum(1 for _ in envelope.pack(encoded, settings.envelope_max_bytes))
    return count / len(bodies)


async def raw_producer_rate(settings: Settings, bodies: list[bytes], seconds: float) -> float:
    """Events/s of a bare producer: the same normalized envelopes, acks=all, 32 sends in flight,
    compressed with Tally's codec (TALLY_KAFKA_COMPRESSION): compressing is the Kafka client's
    work, which the limit must do too."""
    now = int(time.time() * 1000)
    values = []
    events = 0
    for body in bodies:
        encoded = []
        for e in orjson.loads(body)["events"]:
            with contextlib.suppress(InvalidEvent):
                encoded.append(normalize_event(e, now, settings.event_limits))
        values.extend(envelope.pack(encoded, settings.envelope_max_bytes))
        events += len(encoded)
    per_value = events / len(values)
    codec = None if settings.kafka_compression == "none" else settings.kafka_compression
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=2,
                                max_request_size=2 * 1024 * 1024, compression_type=codec)
    await producer.start()
    sent = 0
    try:
        warm = [await producer.send(settings.topic, v) for v in values[:32]]
        await asyncio.gather(*warm)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            futures = [await producer.send(settings.topic, v) for v in values[:32]]
            await asyncio.gather(*futures)
            values = values[32:] + values[:32]
            sent += len(futures)
    finally:
        await producer.stop()
    return sent * per_value / (time.perf_counter() - start)


async def delete_topic(settings: Settings, topics: Sequence[str] = ()) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="bench-admin")
    await admin.start()
    try:
        await admin.delete_topics(list(topics or [settings.topic]))
    finally:
        await admin.close()


async def stored_bytes(settings: Settings, topic: str, start: dict[int, int]) -> tuple[int, int]:
    """(bytes, records) of the record batches stored in `topic` from `start` (partition -> offset,
    advanced to the end): the batches as the producer sent them, compressed, headers included.
    Reads the batch headers only, so it needs no codec. Ends at the fetch's high watermark
    (Tansu's ListOffsets answers the last batch's base offset + 1, not the log end)."""
    client = AIOKafkaClient(bootstrap_servers=settings.kafka_bootstrap, client_id="bench-bytes")
    await client.bootstrap()
    size = records = 0
    try:
        await client.force_metadata_update()
        for partition in sorted(client.cluster.partitions_for_topic(topic) or ()):
            leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
            offset, highwater = start.get(partition, 0), 1 << 62
            while offset < highwater:
                request = FetchRequest(500, 1, 16 << 20, 0, [(topic, [(partition, offset, 16 << 20)])])
                response = await client.send(leader, request)
                [(_, [part])] = response.topics
                highwater, raw = part[2], bytes(part[-1] or b"")
                pos = 0
                # A v2 record batch: base offset (int64), length of the rest (int32), ..., the last
                # offset delta (int32) at byte 23. A batch cut off at the end of the response is
                # fetched again next time.
                while pos + 27 <= len(raw):
                    base, length = struct.unpack_from(">qi", raw, pos)
                    if pos + 12 + length > len(raw):
                        break
                    (delta,) = struct.unpack_from(">i", raw, pos + 23)
                    size += 12 + length
                    records += delta + 1
                    offset = base + delta + 1
                    pos += 12 + length
                if pos == 0:
                    break
            start[partition] = offset
    finally:
        await client.close()
    return size, records


def _get_ok(port: int, path: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
        return bool(r.status == 200)
    return False


def spawn_server(kind: str, workers: int, settings: Settings, port: int, log: Path,
                 server: str = DEFAULT_SERVER) -> subprocess.Popen[bytes]:
    """One server under test, started (see `wait_ready`), on the HTTP server `server` (every kind alike)."""
    if kind == "tally":
        argv = [sys.executable, "-m", "core.cli", "ingest", "--workers", str(workers), "--server", server]
        env = settings.model_copy(update={"ingest_port": port}).process_env()
    else:
        argv = [sys.executable, "-m", f"bench.{kind}_app", "--port", str(port), "--workers", str(workers),
                "--server", server]
        env = {**os.environ, "BENCH_KAFKA": str(settings.kafka_bootstrap), "BENCH_TOPIC": settings.topic}
    with log.open("ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                preexec_fn=devstack._die_with_parent)


def wait_ready(kind: str, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until Tally's `/readyz` (its producer is connected) or the baselines' `/healthz` answers 200."""
    ready = "/readyz" if kind == "tally" else "/healthz"
    devstack.wait_for_port(port, 60, proc)
    deadline = time.monotonic() + 60
    while not _get_ok(port, ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"{kind} never became ready; see {log}")
        time.sleep(0.05)


def start_server(kind: str, workers: int, settings: Settings, port: int, log: Path,
                 server: str = DEFAULT_SERVER) -> subprocess.Popen[bytes]:
    proc = spawn_server(kind, workers, settings, port, log, server)
    wait_ready(kind, port, proc, log)
    return proc


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Phase:
    """One server, one batch size, one connection count: its load results over one or more rounds."""

    kind: str
    workers: int
    batch: int
    connections: int
    pid: int
    compression: str = "none"  # Tally's TALLY_KAFKA_COMPRESSION (the baselines' producers compress nothing)
    loads: list[LoadResult] = field(default_factory=list)

    def add(self, load: LoadResult) -> None:
        self.loads.append(load)
        if load.ok(202) < load.requests:
            raise RuntimeError(f"{self.kind} {self.workers}w answered other than 202: {load.statuses}")

    def row(self) -> dict[str, Any]:
        total = LoadResult(processes=self.loads[0].processes)
        seconds = wall = cpu = 0.0
        watched: dict[str, float] = {}
        for load in self.loads:  # rounds run one after another: add their times, not max them
            total.requests += load.requests
            total.latencies += load.latencies
            for k, v in load.statuses.items():
                total.statuses[k] = total.statuses.get(k, 0) + v
            seconds += load.seconds
            wall += load.wall_seconds
            cpu += load.cpu_seconds
            for k, v in load.watched.items():
                watched[k] = watched.get(k, 0.0) + v * load.seconds
        watched = {k: v / seconds for k, v in watched.items()}
        ok = total.ok(202)
        server_cpu = sum(watched.values())
        workers_cpu = [round(v) for k, v in watched.items() if int(k) != self.pid and v >= 5]  # not the tracker
        return {
            "server": self.kind, "workers": self.workers, "events_per_request": self.batch,
            "connections": self.connections, "rounds": len(self.loads), "compression": self.compression,
            "events_per_s": round(ok * self.batch / seconds), "requests_per_s": round(ok / seconds, 1),
            "round_events_per_s": [round(load.ok(202) * self.batch / load.seconds) for load in self.loads],
            "p50_ms": round(total.percentile(0.5) * 1000, 2), "p99_ms": round(total.percentile(0.99) * 1000, 2),
            "statuses": {str(k): v for k, v in sorted(total.statuses.items())}, "seconds": round(seconds, 2),
            "loadgen_processes": total.processes, "loadgen_cpu_percent": round(100 * cpu / wall),
            "server_cpu_percent": round(server_cpu),
            "worker_cpu_percent": workers_cpu if self.workers > 1 else [round(server_cpu)],
        }


def load_phase(port: int, pid: int, bodies: list[bytes], *, seconds: float, warmup: float,
               connections: int) -> LoadResult:
    procs = tree(pid)  # the server, and its workers when it has several
    return run_load("127.0.0.1", port, "/v1/events", bodies, seconds=seconds, warmup=warmup, connections=connections,
                    watch={str(p): p for p in procs}, watch_descendants=False)


def run(
    *, workers: Sequence[int] = (1, 2), batches: Sequence[int] = (100, 1000), kinds: Sequence[str] = KINDS,
    naive_plan: Iterable[tuple[int, int]] | None = None, noop_plan: Iterable[tuple[int, int]] | None = None,
    seconds: float = 10.0, seconds_by_batch: dict[int, float] | None = None, warmup: float = 2.0, rounds: int = 1,
    rewarm: float = 0.5,
    connections: int = 16, sweep: Sequence[int] = (), sweep_seconds: float = 3.0,
    sweep_servers: Sequence[tuple[str, int]] = (("tally", 1), ("tally", 2), ("noop", 1), ("naive", 1)),
    compressions: Sequence[str] | None = None, http_server: str = DEFAULT_SERVER,
    tmp: Path | None = None, log: Any = print,
) -> dict[str, Any]:
    """For each worker count, every server kind at once (idle but for the one loaded); for each
    batch size, `rounds` rounds of [bare producer, Tally, no-op, straightforward], each
    `seconds / rounds` long, so that a figure and its limits are measured moments apart and
    the machine's drift (it is shared) moves them together. The first load of a server has
    `warmup` seconds of warm-up, later ones `rewarm`. Then the concurrency sweep (100
    events/request) on `sweep_servers`. Returns the figures.

    `naive_plan`, `noop_plan`: the (workers, batch) pairs those baselines run (default: all).
    `seconds_by_batch`: another `seconds` for some batch sizes.
    `compressions`: a Tally server for each codec (default: the settings' default alone), each
    with a topic of its own; in every round they are loaded one after another in an order that
    rotates from round to round. Each Tally row has the bytes its stored record batches took
    per event (`wire_bytes_per_event`).
    """
    tmp = tmp or Path(tempfile.mkdtemp(prefix="tally-bench-ingest-"))
    kafka = devstack.kafka(devstack.free_port()).start()
    redis = devstack.redis(devstack.free_port()).start()
    # No key store in this bench (auth off); the rate limiter still runs (one Redis call per
    # request, as in production) with a limit high enough not to refuse anything.
    settings = Settings(env="test", kafka_bootstrap=kafka.url, redis_url=redis.url, topic="bench.events",
                        drain_seconds=0, topic_partitions=6, auth=False, log_level="warning",
                        rate_limit_events_per_second=int(os.environ.get("BENCH_RATE", "100000000")))
    bodies = {b: make_bodies(b, 50 if b <= 100 else 20) for b in batches}
    codecs = list(compressions or [settings.kafka_compression])
    measure_wire = compressions is not None  # reading the topics back costs the suite's gate time
    records_per_request = {b: envelopes_per_body(settings, bodies[b]) for b in batches}
    plans = {"naive": None if naive_plan is None else set(naive_plan),
             "noop": None if noop_plan is None else set(noop_plan)}

    def planned(kind: str, w: int, b: int) -> bool:
        plan = plans.get(kind)
        return kind in kinds and (plan is None or (w, b) in plan)

    phases: list[dict[str, Any]] = []
    sweeps: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    producer: dict[str, list[float]] = {}
    try:
        for w in workers:
            here = [k for k in KINDS if any(planned(k, w, b) for b in batches)]
            # A server is a slot: (kind, codec); only Tally has several, one per codec.
            slots = [(k, c) for k in here for c in (codecs if k == "tally" else ["none"])]
            servers: dict[tuple[str, str], tuple[int, subprocess.Popen[bytes]]] = {}
            warmed: set[tuple[str, str]] = set()
            # Topics per worker count (one per Tally codec), deleted after it: the broker keeps
            # records in memory, and should not grow (and maybe slow) over the whole run.
            group = settings.model_copy(update={"topic": f"bench.events.{w}w"})
            own = {c: group.model_copy(update={"topic": f"bench.events.{w}w.{c}", "kafka_compression": c})
                   for c in codecs}
            topics = [group.topic, *(o.topic for o in own.values())]
            read_from: dict[str, dict[int, int]] = {c: {} for c in codecs}
            asyncio.run(ensure_topics(group, topics))
            try:
                for kind, c in slots:  # started together, then waited for
                    port = devstack.free_port()
                    config = own[c] if kind == "tally" else group
                    servers[kind, c] = (port, spawn_server(kind, w, config, port, tmp / f"{kind}-{c}-{w}.log",
                                                           http_server))
                for (kind, c), (port, proc) in servers.items():
                    wait_ready(kind, port, proc, tmp / f"{kind}-{c}-{w}.log")
                for b in batches:
                    span = (seconds_by_batch or {}).get(b, seconds)
                    todo = [(k, c) for k, c in slots if planned(k, w, b)]
                    measured = {(k, c): Phase(k, w, b, connections, servers[k, c][1].pid, c) for k, c in todo}
                    for c in codecs if measure_wire else ():  # skip what the last batch size left in the topic
                        asyncio.run(stored_bytes(group, own[c].topic, read_from[c]))
                    rates = []
                    for r in range(rounds):
                        rates.append(asyncio.run(raw_producer_rate(group, bodies[b], span / rounds)))
                        turn = r % len(codecs)  # the codecs' order rotates from round to round
                        tallies = [s for s in todo if s[0] == "tally"]
                        for slot in [*tallies[turn:], *tallies[:turn], *(s for s in todo if s[0] != "tally")]:
                            port, proc = servers[slot]
                            measured[slot].add(load_phase(port, proc.pid, bodies[b], seconds=span / rounds,
                                                          warmup=rewarm if slot in warmed else warmup,
                                                          connections=connections))
                            warmed.add(slot)
                    producer.setdefault(str(b), []).extend(rates)
                    for slot in todo:
                        row = measured[slot].row()
                        row["producer_events_per_s"] = round(sum(rates) / len(rates))  # the paired limit
                        if slot[0] == "tally" and measure_wire:
                            size, records = asyncio.run(stored_bytes(group, own[slot[1]].topic, read_from[slot[1]]))
                            events = records / records_per_request[b] * b
                            row["wire_bytes_per_event"] = round(size / events, 1) if events else None
                        phases.append(row)
                        log("  " + phase_line(row))
                for (kind, c), (_, proc) in servers.items():  # the suite reads `tally-1w`, `noop-1w`
                    named = kind != "tally" or c == codecs[0]
                    memory.extend(peak_rss(proc.pid, label=f"{kind}-{w}w" if named else f"{kind}-{c}-{w}w"))
            finally:
                for _, proc in servers.values():
                    stop_server(proc)
                asyncio.run(delete_topic(group, topics))
        for kind, w in sweep_servers if sweep else ():
            port = devstack.free_port()
            group = settings.model_copy(update={"topic": f"bench.events.sweep.{kind}.{w}w"})
            asyncio.run(ensure_topics(group, [group.topic]))
            proc = start_server(kind, w, group, port, tmp / f"{kind}-{w}-sweep.log", http_server)
            try:
                for i, c in enumerate(sweep):
                    phase = Phase(kind, w, 100, c, proc.pid)
                    phase.add(load_phase(port, proc.pid, bodies[100], seconds=sweep_seconds,
                                         warmup=warmup if i == 0 else rewarm, connections=c))
                    sweeps.append(phase.row())
                    log("  sweep " + phase_line(sweeps[-1]))
            finally:
                stop_server(proc)
                asyncio.run(delete_topic(group))
        for name, server in (("broker", kafka), ("redis", redis)):
            assert server.process is not None
            memory.extend(peak_rss(server.process.pid, label=name))
    finally:
        kafka.stop()
        redis.stop()
    return {"benchmark": "ingest", "http_server": http_server, "cores": os.cpu_count(), "connections": connections,
            "seconds": seconds,
            "warmup": warmup, "rounds": rounds, "compressions": codecs, "producer_compression": codecs[0],
            "bare_producer_events_per_s": {b: round(sum(v) / len(v)) for b, v in producer.items()},
            "phases": phases, "sweep": sweeps, "memory": memory, "auth": False, "rate_limiter": True}


def find(row: dict[str, Any], server: str, workers: int, batch: int, connections: int | None = None) -> dict[str, Any]:
    for p in row["phases"]:
        if (p["server"], p["workers"], p["events_per_request"]) == (server, workers, batch) and (
            connections is None or p["connections"] == connections
        ):
            return p
    raise KeyError((server, workers, batch))


def label(p: dict[str, Any]) -> str:
    codec = p.get("compression", "none")
    return f"{LABELS[p['server']]} [{codec}]" if p["server"] == "tally" and "wire_bytes_per_event" in p else (
        LABELS[p["server"]])


def phase_line(p: dict[str, Any]) -> str:
    wire = f"  {p['wire_bytes_per_event']:,.1f} B/event on the wire" if p.get("wire_bytes_per_event") else ""
    return (f"{label(p):<25} {p['workers']}w {p['events_per_request']:>5} ev/req "
            f"{p['connections']:>3} conns: "
            f"{p['events_per_s']:>9,} events/s {p['requests_per_s']:>8,.0f} req/s  p50 {p['p50_ms']:7.2f} ms  "
            f"p99 {p['p99_ms']:7.2f} ms  CPU % of a core: loadgen {p['loadgen_cpu_percent']}, server "
            f"{p['server_cpu_percent']} {p['worker_cpu_percent'] if p['workers'] > 1 else ''} statuses {p['statuses']}"
            f"{wire}")


def report(row: dict[str, Any]) -> Iterable[str]:
    yield (f"{row['cores']} cores shared by everything; {row['connections']} connections, {row['seconds']:g} s per "
           f"phase after {row['warmup']:g} s warm-up; every server on {row.get('http_server', 'uvicorn')}; "
           "Tally: auth off, rate limiter on")
    for b, rate in row["bare_producer_events_per_s"].items():
        yield (f"bare aiokafka producer, same envelopes of {b}-event batches, acks=all, "
               f"{row.get('producer_compression', 'none')}: {rate:,} events/s")
    for p in row["phases"]:
        yield phase_line(p)
    for p in row["phases"]:
        if p["server"] != "tally":
            continue
        w, b = p["workers"], p["events_per_request"]
        parts = [f"{p['events_per_s'] / p['producer_events_per_s']:.3f} of the bare producer"]
        for other in ("noop", "naive"):
            with contextlib.suppress(KeyError):
                q = find(row, other, w, b)
                parts.append(f"{p['requests_per_s'] / q['requests_per_s']:.3f}x the {LABELS[other]}'s rate")
        codec = f" [{p['compression']}]" if "wire_bytes_per_event" in p else ""
        yield f"Tally {w}w {b} ev/req{codec}: " + ", ".join(parts)
    yield from codec_report(row)
    for m in row["memory"]:
        yield f"peak RSS {m['process']:<10} pid {m['pid']:>7}: {m['peak_rss_mib']:8.1f} MiB  {m['cmd'][:70]}"


def codec_report(row: dict[str, Any]) -> Iterable[str]:
    """Each codec beside the first one of the run (`none` when it is listed first): events/s as
    the median of the per-round ratios (each round measures both moments apart) with their range,
    and bytes on the wire per event with the compression ratio."""
    codecs = row.get("compressions", [])
    if len(codecs) < 2:
        return
    base = codecs[0]
    tally = [p for p in row["phases"] if p["server"] == "tally"]
    for p in tally:
        ref = next(q for q in tally if (q["workers"], q["events_per_request"], q["compression"]) ==
                   (p["workers"], p["events_per_request"], base))
        ratios = sorted(a / b for a, b in zip(p["round_events_per_s"], ref["round_events_per_s"], strict=True))
        wire, ref_wire = p.get("wire_bytes_per_event"), ref.get("wire_bytes_per_event")
        squeeze = f"{wire:,.1f} B/event on the wire, ratio {ref_wire / wire:.2f}" if wire and ref_wire else ""
        yield (f"Tally {p['workers']}w {p['events_per_request']} ev/req {p['compression']:<6}: "
               f"{p['events_per_s']:>9,} events/s, {statistics.median(ratios):.3f} of {base}'s "
               f"(rounds {ratios[0]:.3f}-{ratios[-1]:.3f}); {squeeze}; "
               f"server CPU {p['server_cpu_percent']} % of a core")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=1, help="alternations of the servers within --seconds")
    parser.add_argument("--batch", type=int, nargs="+", default=[100])
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--servers", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--sweep", type=int, nargs="*", default=[], help="connection counts for the sweep")
    parser.add_argument("--compression", nargs="+", default=None, choices=CODECS,
                        help="a Tally server per codec (TALLY_KAFKA_COMPRESSION), each beside the first "
                             "(list none first) in every round; default: the settings' default alone")
    parser.add_argument("--server", default=DEFAULT_SERVER, choices=SERVERS,
                        help=f"the HTTP server of every server kind (default: Tally's, {DEFAULT_SERVER})")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    row = run(workers=args.workers, batches=args.batch, kinds=args.servers, seconds=args.seconds,
              warmup=args.warmup, rounds=args.rounds, connections=args.connections, sweep=args.sweep,
              compressions=args.compression, http_server=args.server)
    print()
    for line in report(row):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
