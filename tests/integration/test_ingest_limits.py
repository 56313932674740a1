"""Rate limits, clock-skew correction and every size limit at its edge, over real HTTP."""

from __future__ import annotations

import asyncio
import gzip
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import psutil
import pytest

from core.auth import KeyStore
from core.db import write_engine
from core.settings import Settings
from ingest.app import create_app
from tests.conftest import serve
from tests.kafka_read import read_topic
from tests.processes import tally_process

pytestmark = pytest.mark.integration


def events(n: int) -> dict[str, list[dict[str, str]]]:
    return {"events": [{"type": "r"}] * n}


async def test_rate_limit_per_key_with_headers(migrated: Settings) -> None:
    settings = migrated.model_copy(update={"rate_limit_events_per_second": 100, "rate_limit_burst_seconds": 1.0})
    async with serve(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        first = await http.post("/v1/events", json=events(60))
        refused = await http.post("/v1/events", json=events(60))
        too_big = await http.post("/v1/events", json=events(101))
        await asyncio.sleep(float(refused.headers["retry-after"]))
        later = await http.post("/v1/events", json=events(60))
    assert first.status_code == 202
    assert first.headers["ratelimit-limit"] == "100"
    assert 40 <= int(first.headers["ratelimit-remaining"]) <= 41  # refilled a little meanwhile
    assert refused.status_code == 429 and refused.headers["content-type"] == "application/problem+json"
    assert int(refused.headers["retry-after"]) >= 1 and refused.headers["ratelimit-limit"] == "100"
    assert "100 events/s" in refused.json()["detail"]
    assert too_big.status_code == 429 and "exceeds this key's burst of 100" in too_big.json()["detail"]
    assert later.status_code == 202
    assert len(await read_topic(migrated.kafka_bootstrap or "", migrated.topic, expect_events=120)) == 120


async def test_one_keys_limit_leaves_another_keys_budget(migrated: Settings) -> None:
    """Buckets are per API key: a producer that spends its own budget does not slow another one down."""
    settings = migrated.model_copy(
        update={"auth": True, "rate_limit_events_per_second": 100, "rate_limit_burst_seconds": 1.0}
    )
    store = KeyStore(write_engine(str(settings.postgres_url), pool_size=1), cache_seconds=0)
    try:
        tokens = [(await store.create(name, ["ingest"], rate_limit=limit))[1]
                  for name, limit in (("noisy", None), ("quiet", None), ("own limit", 30))]
    finally:
        await store.close()
    noisy, quiet, own = ({"authorization": f"Bearer {token}"} for token in tokens)
    async with serve(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        spent = await http.post("/v1/events", json=events(90), headers=noisy)
        refused = await http.post("/v1/events", json=events(100), headers=noisy)  # needs 0.9 s of refill
        other = await http.post("/v1/events", json=events(90), headers=quiet)
        own_spent = await http.post("/v1/events", json=events(30), headers=own)
        own_refused = await http.post("/v1/events", json=events(30), headers=own)  # needs 1 s of refill
    assert spent.status_code == 202 and refused.status_code == 429
    # A bucket of its own, full when first used: exactly 100 - 90 left, whatever the noisy key did.
    assert other.status_code == 202
    assert (other.headers["ratelimit-limit"], other.headers["ratelimit-remaining"]) == ("100", "10")
    assert own_spent.status_code == 202
    assert (own_spent.headers["ratelimit-limit"], own_spent.headers["ratelimit-remaining"]) == ("30", "0")
    assert own_refused.status_code == 429 and "30 events/s" in own_refused.json()["detail"]
    assert len(await read_topic(migrated.kafka_bootstrap or "", migrated.topic, expect_events=210)) == 210


async def test_sent_at_corrects_the_producer_clock(migrated: Settings) -> None:
    producer_clock = int(time.time() * 1000) - 3_600_000  # an hour behind
    batch = {
        "sent_at": datetime.fromtimestamp(producer_clock / 1000, UTC).isoformat(),
        "events": [{"type": "s", "ts": producer_clock - 10_000}, {"type": "t"}],
    }
    async with serve(create_app(migrated)) as url, httpx.AsyncClient(base_url=url) as http:
        ok = await http.post("/v1/events", json=batch)
        bad = await http.post("/v1/events", json={"sent_at": "soon", "events": [{"type": "s"}]})
    assert ok.status_code == 202 and ok.json()["accepted"] == 2
    assert bad.status_code == 400 and "sent_at" in bad.json()["detail"]
    got = {e["type"]: e for e, _ in await read_topic(migrated.kafka_bootstrap or "", migrated.topic, expect_events=2)}
    # ts' = received_at - (sent_at - ts): ten seconds before receipt, on the server's clock.
    assert got["s"]["ts"] == got["s"]["received_at"] - 10_000
    assert got["t"]["ts"] == got["t"]["received_at"]


async def test_size_limits_at_the_edge(migrated: Settings) -> None:
    body = orjson.dumps(events(3))
    settings = migrated.model_copy(update={"max_body_bytes": len(body), "max_events": 3})
    async with serve(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        json_type = {"content-type": "application/json"}
        at = await http.post("/v1/events", content=body, headers=json_type)
        over = await http.post("/v1/events", content=body + b" ", headers=json_type)
        gz = {**json_type, "content-encoding": "gzip"}
        gz_at = await http.post("/v1/events", content=gzip.compress(body), headers=gz)
        gz_over = await http.post("/v1/events", content=gzip.compress(body + b" "), headers=gz)
    assert at.status_code == 202 and gz_at.status_code == 202
    for r in (over, gz_over):
        assert r.status_code == 413 and f"limit of {len(body)} bytes" in r.json()["detail"]


async def test_event_count_limit_at_the_edge(migrated: Settings) -> None:
    settings = migrated.model_copy(update={"max_events": 5})
    async with serve(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        at = await http.post("/v1/events", json=events(5))
        over = await http.post("/v1/events", json=events(6))
    assert at.status_code == 202 and at.json()["accepted"] == 5
    assert over.status_code == 413 and over.json()["detail"] == "batch has 6 events; the limit is 5"


async def test_gzip_bomb_is_refused_fast_with_bounded_memory(migrated: Settings, tmp_path: Path) -> None:
    import zlib

    squeezer = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = squeezer.compress(b"\0" * (200 * 1024 * 1024)) + squeezer.flush()
    ingest = tally_process("ingest", migrated, tmp_path).start()
    try:
        assert ingest.process is not None
        process = psutil.Process(ingest.process.pid)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ingest.port}", timeout=30) as http:
            await http.post("/v1/events", json=events(1))  # warm up
            before = process.memory_info().rss
            started = time.perf_counter()
            r = await http.post("/v1/events", content=bomb,
                                headers={"content-type": "application/json", "content-encoding": "gzip"})
            elapsed = time.perf_counter() - started
            after = process.memory_info().rss
    finally:
        ingest.stop()
    assert len(bomb) < 250_000
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"
    assert "decoded body exceeds the limit of 5242880 bytes" in r.json()["detail"]
    assert elapsed < 2.0, f"took {elapsed:.2f} s"
    assert after - before < 64 * 1024 * 1024, f"RSS grew by {(after - before) / 2**20:.0f} MiB"
