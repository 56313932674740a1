"""Helpers for consumer tests: produce envelopes, run consumers, read back tables and offsets.

Expected aggregates are computed here by a deliberately naive model of the
shipped rollups (events_by_type, page_views), independent of consumers.aggregate.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer

from consumers.main import run
from core import devstack
from core.settings import Settings
from schemas.envelope import headers as envelope_headers
from schemas.envelope import pack
from schemas.events import EventLimits, normalize_event

Row = tuple[Any, ...]


def now_ms() -> int:
    return int(time.time() * 1000)


def make_events(n: int, rng: random.Random, received_at: int | None = None) -> list[bytes]:
    """`n` normalized events (encoded), spread over a few hours of buckets and every value shape."""
    received = received_at or now_ms()
    out = []
    for _ in range(n):
        raw: dict[str, Any] = {
            "type": rng.choice(["click", "page_view", "purchase"]),
            "ts": received - rng.randrange(0, 3 * 3_600_000),
        }
        if rng.random() < 0.7:
            raw["source"] = rng.choice(["web", "ios", "android"])
        props: dict[str, Any] = {}
        amount = rng.choice([None, 1, 250, -7, 0.1, 19.99, 1e-3, "12", True, 2**40])
        if amount is not None:
            props["amount"] = amount
        if rng.random() < 0.8:
            props["country"] = rng.choice(["DE", "FR", "US", "", 49])
        if rng.random() < 0.8:
            props["path"] = rng.choice(["/", "/pricing", "/docs/a b"])
        if props:
            raw["properties"] = props
        out.append(normalize_event(raw, received, EventLimits()))
    return out


def envelopes(encoded: Sequence[bytes], per_record: int) -> list[bytes]:
    return [next(pack(encoded[i:i + per_record], 1 << 30)) for i in range(0, len(encoded), per_record)]


async def produce(settings: Settings, records: Sequence[tuple[int, bytes]]) -> dict[int, int]:
    """Send (partition, value) records with acks=all; returns each partition's end offset."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        futures = [
            await producer.send(settings.topic, value, partition=p, headers=envelope_headers(uuid.uuid4().hex))
            for p, value in records
        ]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    ends: dict[int, int] = {}
    for meta in metas:
        ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    return ends


def spread(values: list[bytes], partitions: int) -> list[tuple[int, bytes]]:
    """Records round-robin over the partitions, as (partition, value)."""
    return [(i % partitions, v) for i, v in enumerate(values)]


def consumer_settings(settings: Settings, **overrides: Any) -> Settings:
    """Settings for one consumer process: its own metrics port."""
    return settings.model_copy(update={"consumer_metrics_port": devstack.free_port(), **overrides})


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[asyncio.Event, asyncio.Task[None]]]:
    """A consumer (consumers.main.run) as a task; stopped gracefully on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop=stop))
    try:
        yield stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def stored_offsets(settings: Settings) -> dict[int, int]:
    conn = await asyncpg.connect(settings.postgres_url)
    try:
        rows = await conn.fetch(
            "SELECT partition, next_offset FROM tally_offsets WHERE group_id=$1 AND topic=$2",
            settings.consumer_group, settings.topic,
        )
    finally:
        await conn.close()
    return {r["partition"]: r["next_offset"] for r in rows}


async def wait_for_offsets(settings: Settings, ends: dict[int, int], tasks: Sequence[asyncio.Task[None]] = (),
                           timeout: float = 60.0) -> None:
    """Until every partition's stored offset reaches its end; fails early if a consumer died."""
    deadline = time.monotonic() + timeout
    while True:
        for task in tasks:
            if task.done():
                task.result()
                raise AssertionError("consumer exited early")
        stored = await stored_offsets(settings)
        if all(stored.get(p, 0) >= end for p, end in ends.items()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"offsets {stored} never reached {ends}")
        await asyncio.sleep(0.05)


async def table(settings: Settings, name: str) -> dict[Row, Row]:
    """A rollup table as {(bucket, dims...): (measures...)}, its sketch measures left out: their bytes
    depend on the order values arrived in (tests/fault/support.py checks them by what they estimate)."""
    spec = next(s for s in settings.rollups if name in s.tables)
    plain = [m.column for m in spec.measures if not m.is_sketch]
    columns = ", ".join(f'"{c}"' for c in (*spec.key_columns, *plain))
    conn = await asyncpg.connect(settings.postgres_url)
    try:
        records = await conn.fetch(f'SELECT {columns} FROM "{name}"')
    finally:
        await conn.close()
    keys = len(spec.key_columns)
    return {tuple(r.values())[:keys]: tuple(r.values())[keys:] for r in records}


def _dim(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def expected_tables(events: Sequence[dict[str, Any]]) -> dict[str, dict[Row, Row]]:
    """The shipped rollups computed the slow, obvious way."""
    counts: dict[Row, int] = defaultdict(int)
    amounts: dict[Row, list[Decimal]] = defaultdict(list)
    pages: dict[Row, int] = defaultdict(int)
    for e in events:
        minute = datetime.fromtimestamp(e["ts"] // 60_000 * 60, UTC)
        props = e.get("properties", {})
        key = (minute, e["type"], e.get("source", ""))
        counts[key] += 1
        amount = props.get("amount")
        if isinstance(amount, int | float) and not isinstance(amount, bool):
            amounts[key].append(Decimal(str(amount)))
        if e["type"] == "page_view":
            pages[(minute, _dim(props.get("country")), _dim(props.get("path")))] += 1
    by_type = {
        k: (n, sum(amounts[k]), min(amounts[k]), max(amounts[k])) if amounts[k] else (n, None, None, None)
        for k, n in counts.items()
    }
    return {"agg_events_by_type": by_type, "agg_page_views": {k: (n,) for k, n in pages.items()}}


async def assert_tables_match(settings: Settings, events: Sequence[dict[str, Any]]) -> None:
    expected = expected_tables(events)
    for name, rows in expected.items():
        assert await table(settings, name) == rows, name
