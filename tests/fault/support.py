"""Shared by the fault tests: a producer's ledger of what got a 2xx, streams through a real ingest
app, probes that time every answer, catching up with the topic, and the exact-count invariant.

The invariant every fault test ends with: the rollup tables equal the aggregates (tests/oracle.py)
of exactly the events that got a 2xx from ingest (or, in test_consumer_kills, an ack from the
broker): nothing lost, nothing counted twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import datasketches as ds
import httpx
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.devstack import EmbeddedServer
from core.settings import Settings
from schemas import sketches
from tests import oracle
from tests.e2e.conftest import expected_events_by_type, table_rows
from tests.integration.consumer_helpers import stored_offsets
from tests.processes import TallyProcess, tally_process

MEASURES = ["count", "sum_properties_amount", "min_properties_amount", "max_properties_amount"]
ROLLUP = "/v1/rollups/events_by_type"
# Totals per (type, source) over every event a test sends (their ts lie in the last 3 hours).
TOTALS = {"fields": "type,source," + ",".join(MEASURES), "from": "-4h", "to": "+5m", "limit": "10000"}
NO_CACHE = {"Cache-Control": "no-cache"}

Event = dict[str, Any]


def seeded() -> tuple[int, str]:
    """A seed (TALLY_FAULT_SEED, or a random one) and the text that says how to rerun with it."""
    seed = int(os.environ.get("TALLY_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    return seed, f"seed {seed} (rerun with TALLY_FAULT_SEED={seed})"


def now_ms() -> int:
    return int(time.time() * 1000)


# -- A producer's ledger --------------------------------------------------------------------------


@dataclass
class Attempt:
    """One HTTP attempt at a batch: when it was sent and answered, and the answer (status 0: the
    client gave up on a timeout or lost the connection)."""

    batch: int
    key: str | None
    sent: float  # time.monotonic()
    done: float
    status: int
    headers: httpx.Headers
    body: bytes
    error: str = ""

    @property
    def elapsed(self) -> float:
        return self.done - self.sent

    def problem(self) -> dict[str, Any]:
        assert self.headers.get("content-type") == "application/problem+json", self
        body: dict[str, Any] = orjson.loads(self.body)
        return body

    def __repr__(self) -> str:
        return (
            f"Attempt(batch={self.batch}, key={self.key!r}, status={self.status}, elapsed={self.elapsed:.3f}, "
            f"error={self.error!r}, body={self.body[:200]!r})"
        )


@dataclass
class Batch:
    events: list[Event]
    key: str | None
    body: bytes  # a retry sends these very bytes (an Idempotency-Key is bound to the body)


@dataclass
class Ledger:
    """What a producer knows: every batch, every attempt, and which batches got a 2xx."""

    batches: list[Batch] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    accepted: set[int] = field(default_factory=set)

    def new(self, events: list[Event], key: str | None = None) -> int:
        self.batches.append(Batch(events, key, orjson.dumps({"events": events})))
        return len(self.batches) - 1

    def events(self) -> list[Event]:
        """The events of every batch that got a 2xx, each batch once however often it was sent."""
        return [e for i in sorted(self.accepted) for e in self.batches[i].events]

    def refused(self) -> list[int]:
        return [i for i in range(len(self.batches)) if i not in self.accepted]

    def between(self, start: float, end: float) -> list[Attempt]:
        """The attempts sent at or after `start` and answered at or before `end`."""
        return [a for a in self.attempts if a.sent >= start and a.done <= end]


async def send(http: httpx.AsyncClient, ledger: Ledger, batch: int, *, timeout: float | None = None) -> Attempt:
    """POST one batch of the ledger (again, for a retry) and record the answer."""
    b = ledger.batches[batch]
    headers = {"content-type": "application/json", **({"Idempotency-Key": b.key} if b.key else {})}
    sent = time.monotonic()
    try:
        r = await http.post("/v1/events", content=b.body, headers=headers, timeout=timeout or http.timeout)
        attempt = Attempt(batch, b.key, sent, time.monotonic(), r.status_code, r.headers, r.content)
    except httpx.TransportError as exc:  # a client-side timeout included: the answer is unknown
        attempt = Attempt(batch, b.key, sent, time.monotonic(), 0, httpx.Headers(), b"", type(exc).__name__)
    ledger.attempts.append(attempt)
    if 200 <= attempt.status < 300:
        result = orjson.loads(attempt.body)
        assert result == {"accepted": len(b.events), "rejected": []}, attempt
        ledger.accepted.add(batch)
    return attempt


async def stream(
    http: httpx.AsyncClient,
    ledger: Ledger,
    rng: random.Random,
    stop: asyncio.Event,
    *,
    size: int,
    pause: float,
    key: Callable[[int], str | None] = lambda i: None,
    ids: bool = False,
) -> None:
    """Post fresh batches of `size` valid events, one after the other, until `stop`; with `ids`,
    every event carries its own event_id."""
    while not stop.is_set():
        n = len(ledger.batches)
        events = oracle.make_events(rng, size, now_ms())
        await send(http, ledger, ledger.new(with_ids(events, rng) if ids else events, key(n)))
        await asyncio.sleep(pause)


async def deliver(
    http: httpx.AsyncClient, ledger: Ledger, batch: int, *, timeout: float | None = None, give_up: float = 30.0
) -> list[Attempt]:
    """Send one batch, retrying the same body (and key) after a timeout, a 409 or a 503 until a 2xx,
    as an SDK does (pausing 0.2 s rather than Retry-After's 1 s, to keep the tests short)."""
    started = time.monotonic()
    tries: list[Attempt] = []
    while True:
        attempt = await send(http, ledger, batch, timeout=timeout)
        tries.append(attempt)
        if attempt.status == 202:
            return tries
        assert attempt.status in (0, 409, 503), attempt
        assert time.monotonic() - started < give_up, tries
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def streaming(
    ingest: httpx.AsyncClient,
    ledger: Ledger,
    rng: random.Random,
    *,
    size: int = 40,
    pause: float = 0.05,
    key: Callable[[int], str | None] = lambda i: None,
    ids: bool = False,
    query: httpx.AsyncClient | None = None,
    probes: list[Probe] | None = None,
    **poll_kwargs: Any,
) -> AsyncIterator[None]:
    """While inside: batches stream into ingest and, given `query`, the totals are polled every 100 ms."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(stream(ingest, ledger, rng, stop, size=size, pause=pause, key=key, ids=ids))]
    if query is not None and probes is not None:
        tasks.append(asyncio.create_task(poll(query, probes, stop, pause=0.1, **poll_kwargs)))
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def keyed_every(n: int, tag: str) -> Callable[[int], str | None]:
    """Every n-th batch carries an Idempotency-Key unique to the test."""
    return lambda i: f"{tag}-{i}" if i % n == 0 else None


# -- Probes: timed GETs --------------------------------------------------------------------------


@dataclass
class Probe:
    sent: float
    done: float
    status: int
    headers: httpx.Headers
    body: bytes

    @property
    def elapsed(self) -> float:
        return self.done - self.sent

    def __repr__(self) -> str:
        return (
            f"Probe(sent={self.sent:.3f}, status={self.status}, elapsed={self.elapsed:.3f}, "
            f"x_cache={self.headers.get('x-cache')}, body={self.body[:160]!r})"
        )


async def probe(http: httpx.AsyncClient, path: str, **kwargs: Any) -> Probe:
    sent = time.monotonic()
    r = await http.get(path, **kwargs)
    return Probe(sent, time.monotonic(), r.status_code, r.headers, r.content)


async def poll(
    http: httpx.AsyncClient, probes: list[Probe], stop: asyncio.Event, *, pause: float, **kwargs: Any
) -> None:
    """GET the rollup totals until `stop`, keeping every timed answer."""
    while not stop.is_set():
        probes.append(await probe(http, ROLLUP, params=TOTALS, **kwargs))
        await asyncio.sleep(pause)


def assert_problem_503(answers: Sequence[Attempt | Probe], bound: float, why: str = "") -> None:
    """Each answer is a 503 problem+json with Retry-After, given within `bound` seconds."""
    for a in answers:
        assert a.status == 503, (why, a)
        assert a.headers.get("retry-after") == "1", (why, a)
        assert a.headers.get("content-type") == "application/problem+json", (why, a)
        body = orjson.loads(a.body)
        assert body["status"] == 503 and body["title"] and body["detail"], (why, a)
        assert a.elapsed < bound, (why, f"{a.elapsed:.2f} s", a)


async def until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll a condition; the seconds it took. Fails with `what` past the deadline."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


# -- Totals through the query API ----------------------------------------------------------------

Totals = dict[tuple[str, str], dict[str, Any]]


def expected_totals(events: Sequence[Event]) -> Totals:
    """What `TOTALS` must answer: the oracle's rows merged over every bucket."""
    out: Totals = {}
    for (_, kind, source), row in oracle.events_by_type(events).items():
        t = out.setdefault((kind, source), dict.fromkeys(MEASURES) | {"count": 0})
        t["count"] += row["count"]
        for m, value, pick in (
            ("sum_properties_amount", row["sum"], None),
            ("min_properties_amount", row["min"], min),
            ("max_properties_amount", row["max"], max),
        ):
            if value is None:
                continue
            current = t[m]
            t[m] = value if current is None else (current + value if pick is None else pick(current, value))
    return out


def answered_totals(body: bytes) -> Totals:
    """The totals a `TOTALS` answer holds, every number exact (decimals as Decimal)."""
    data = json.loads(body, parse_float=Decimal)
    assert data["next_cursor"] is None, "the totals do not fit one page"
    return {(r["type"], r["source"]): {m: r[m] for m in MEASURES} for r in data["data"]}


# -- Kafka and Postgres --------------------------------------------------------------------------


async def topic_ends(settings: Settings) -> dict[int, int]:
    """The log end offset of every non-empty partition of the test's topic."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.fetch_all_metadata()
        tps = [TopicPartition(settings.topic, p) for p in sorted(consumer.partitions_for_topic(settings.topic) or [])]
        assert tps, f"topic {settings.topic} has no partitions"
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {tp.partition: end for tp, end in ends.items() if end > 0}


def signal_all(server: EmbeddedServer, sig: signal.Signals) -> None:
    """Send `sig` to a server and its children. Postgres backends leave the postmaster's process
    group (setsid), so SIGSTOP to the postmaster alone freezes new sessions, not the open ones."""
    assert server.process is not None
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for each in [pid, *map(int, children)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, sig)


async def start_consumer(settings: Settings, tmp: Path) -> TallyProcess:
    """A `tally consume` process, started in a thread so the event loop keeps serving."""
    return await asyncio.to_thread(tally_process("consume", settings, tmp).start)


def consumer_logs(tmp: Path) -> list[str]:
    return [path.read_text(errors="replace") for path in sorted(tmp.glob("consume-*.log"))]


async def wait_caught_up(
    settings: Settings, ends: dict[int, int], procs: Sequence[TallyProcess], why: str, timeout: float = 45.0
) -> float:
    """Until every partition's stored offset reaches its end; fails at once if a consumer died.
    Returns the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        stored = await stored_offsets(settings)
        if all(stored.get(p, 0) >= end for p, end in ends.items()):
            return time.monotonic() - started
        for proc in procs:
            assert proc.process is not None and proc.process.poll() is None, f"{why}: a consumer died\n{proc.log()}"
        if time.monotonic() > deadline:
            raise AssertionError(f"{why}: stored offsets {stored} never reached {ends}\n{await activity(settings)}")
        await asyncio.sleep(0.2)


async def activity(settings: Settings) -> str:
    """What every session of the test's database is doing, for a failure message."""
    conn = await asyncpg.connect(settings.postgres_url)
    try:
        rows = await conn.fetch(
            "SELECT pid, application_name, state, wait_event_type, wait_event, now() - xact_start AS age, "
            "pg_blocking_pids(pid) AS blocked_by, left(query, 160) AS query FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() ORDER BY pid"
        )
    finally:
        await conn.close()
    return "\n".join(str(dict(r)) for r in rows)


async def seen_ids(settings: Settings) -> int:
    conn = await asyncpg.connect(settings.postgres_url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM tally_seen_events"))
    finally:
        await conn.close()


async def assert_rollups_exact(settings: Settings, events: Sequence[Event], why: str = "") -> None:
    """The invariant: both shipped rollup tables equal the oracle's aggregates of `events`, row by row."""
    url = str(settings.postgres_url)
    by_type = await table_rows(url, "agg_events_by_type", ["type", "source"], MEASURES)
    assert sum(row["count"] for row in by_type.values()) == len(events), why
    assert by_type == expected_events_by_type(list(events)), why
    views = await table_rows(url, "agg_page_views", ["properties_country", "properties_path"], ["count"])
    assert views == {k: {"count": v["count"]} for k, v in oracle.page_views(events).items()}, why
    for granularity in ("minute", "day"):
        await assert_sketches_exact(url, events, granularity, why)


async def assert_sketches_exact(url: str, events: Sequence[Event], granularity: str, why: str = "") -> None:
    """Every events_by_type row's distinct-user HLL has exactly the estimate of one sketch of its
    events' user ids (an HLL union is order-independent, so no crash sequence may change it), and
    its amounts KLL holds exactly as many values, with the same least and greatest."""
    table = "agg_events_by_type" + ("" if granularity == "minute" else f"__{granularity}")
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            f"SELECT bucket, type, source, uniq_user_id, quantiles_properties_amount FROM {table}"
        )
    finally:
        await conn.close()
    want = oracle.sketches_by_type(events, granularity)
    assert {(r["bucket"], r["type"], r["source"]) for r in rows} == set(want), why
    for r in rows:
        w = want[(r["bucket"], r["type"], r["source"])]
        if w["users"].is_empty():
            assert r["uniq_user_id"] is None, why
        else:
            got = sketches.decode_uniq(r["uniq_user_id"]).get_estimate()
            one = sketches.decode_uniq(sketches.encode(w["users"])).get_estimate()  # one sketch, stored as Tally does
            assert got == one, f"{table} {tuple(r)[:3]}: {why}"
        if not w["amounts"]:
            assert r["quantiles_properties_amount"] is None, why
        else:
            kll = ds.kll_doubles_sketch.deserialize(r["quantiles_properties_amount"])
            assert (kll.n, kll.get_min_value(), kll.get_max_value()) == (
                len(w["amounts"]),
                min(w["amounts"]),
                max(w["amounts"]),
            ), f"{table} {tuple(r)[:3]}: {why}"


def with_ids(events: list[Event], rng: random.Random) -> list[Event]:
    """The events with an `event_id` each, as a careful SDK sends them (so a retry re-sends the same ids)."""
    return [{**e, "event_id": e.get("event_id") or str(uuid.UUID(int=rng.getrandbits(128), version=4))} for e in events]
