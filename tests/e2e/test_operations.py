"""Graceful operations of real `tally` processes: SIGTERM drains ingest and query (readiness
first, in-flight work finished, the producer flushed), and JSON logs carry a request id from
ingest through the Kafka record headers into the consumer's logs."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from core.settings import Settings
from tests import oracle
from tests.kafka_read import read_topic
from tests.processes import TallyProcess, tally_process

pytestmark = pytest.mark.e2e

DRAIN = 1.5
SERVERS = pytest.mark.parametrize("server", ["uvicorn", "granian"])
# uvicorn re-raises the signal once it has shut down gracefully (the conventional "terminated");
# Granian's supervisor exits 0 once its workers have.
GRACEFUL_EXIT = {"uvicorn": -signal.SIGTERM, "granian": 0}


def json_lines(process: TallyProcess) -> list[dict[str, Any]]:
    """Every line the process logged; each must be one JSON object."""
    return [json.loads(line) for line in process.log().splitlines() if line.strip()]


async def readiness(url: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(f"{url}/readyz")
        return response.status_code, response.json()


async def refused(url: str, deadline: float) -> bool:
    """Whether new connections are refused before `deadline` (monotonic)."""
    while time.monotonic() < deadline:
        try:
            async with httpx.AsyncClient(timeout=1) as http:
                await http.get(f"{url}/healthz")
        except httpx.TransportError:
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.fixture
def draining(migrated: Settings) -> Settings:
    return migrated.model_copy(update={"drain_seconds": DRAIN, "shutdown_grace_seconds": 10.0, "log_format": "json"})


@SERVERS
async def test_sigterm_drains_ingest(draining: Settings, tmp_path: Path, server: str) -> None:
    rng = random.Random(5)
    slow_events = oracle.make_events(rng, 300, int(time.time() * 1000))
    quick_events = oracle.make_events(rng, 20, int(time.time() * 1000))
    ingest = tally_process("ingest", draining, tmp_path, "--server", server).start()
    url = f"http://127.0.0.1:{ingest.port}"
    first_chunk_sent = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        for i in range(0, len(slow_events), 50):  # six chunks over ~3 s: in flight across the drain
            yield b"\n".join(orjson.dumps(e) for e in slow_events[i:i + 50]) + b"\n"
            first_chunk_sent.set()
            await asyncio.sleep(0.5)

    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as slow, \
                httpx.AsyncClient(base_url=url, timeout=30) as other:
            in_flight = asyncio.create_task(slow.post(
                "/v1/events", content=slow_body(),
                headers={"content-type": "application/x-ndjson", "x-request-id": "slow-batch"}))
            await first_chunk_sent.wait()
            await asyncio.sleep(0.2)
            assert ingest.process is not None
            ingest.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.sleep(0.2)
            status, body = await readiness(url)
            # Draining: out of the balancer, but still serving what is already on its way.
            assert (status, body["draining"], body["ready"]) == (503, True, False)
            quick = await other.post("/v1/events", json={"events": quick_events},
                                     headers={"x-request-id": "during-drain"})
            assert quick.status_code == 202 and quick.json()["accepted"] == 20
            assert await refused(url, signalled + DRAIN + 3)  # then new connections are refused
            assert time.monotonic() - signalled >= DRAIN - 0.1
            done = await in_flight
        assert done.status_code == 202 and done.json()["accepted"] == 300  # the in-flight request finished
        exit_code = ingest.process.wait(15)
    finally:
        ingest.kill()
    assert exit_code == GRACEFUL_EXIT[server]
    records = await read_topic(str(draining.kafka_bootstrap), draining.topic, expect_events=320)
    by_request: dict[str, list[str]] = {}
    for event, headers in records:
        by_request.setdefault(headers["tally-request-id"].decode(), []).append(event["type"])
    assert sorted(by_request) == ["during-drain", "slow-batch"]  # every event reached Kafka, once
    assert sorted(by_request["slow-batch"]) == sorted(e["type"] for e in slow_events)
    assert sorted(by_request["during-drain"]) == sorted(e["type"] for e in quick_events)
    lines = json_lines(ingest)
    assert any(line["msg"].startswith("SIGTERM: not ready") and line["service"] == "ingest" for line in lines)


@SERVERS
async def test_sigterm_lets_a_query_export_finish(draining: Settings, tmp_path: Path, server: str) -> None:
    conn = await asyncpg.connect(str(draining.postgres_url))
    try:
        await conn.execute(
            "INSERT INTO agg_events_by_type (bucket, type, source, count) SELECT timestamptz '2026-04-10'"
            " + make_interval(mins => g), 't' || (g % 5), 's', 1 FROM generate_series(1, 200000) AS g")
    finally:
        await conn.close()
    settings = draining.model_copy(update={"max_limit": 100, "default_limit": 100, "max_buckets": 10**6})
    query = tally_process("query", settings, tmp_path, "--server", server).start()
    url = f"http://127.0.0.1:{query.port}"
    params = {"from": "2026-04-01T00:00:00Z", "to": "2026-12-01T00:00:00Z", "format": "csv", "limit": "300000",
              "fields": "bucket,type,count"}
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http, \
                http.stream("GET", "/v1/rollups/events_by_type", params=params) as export:
            assert export.status_code == 200 and export.headers["x-cache"] == "stream"
            chunks = export.aiter_raw()
            received = [await anext(chunks)]
            assert query.process is not None
            query.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            status, body = await readiness(url)
            assert (status, body["draining"]) == (503, True)
            await asyncio.sleep(DRAIN)  # past the drain: the server now waits for this response only
            received += [chunk async for chunk in chunks]
        exit_code = query.process.wait(15)
    finally:
        query.kill()
    assert exit_code == GRACEFUL_EXIT[server]
    assert b"".join(received).count(b"\r\n") == 1 + 200_000  # the header and every row: nothing cut off


async def test_request_ids_reach_the_consumer_logs(migrated: Settings, tmp_path: Path) -> None:
    settings = migrated.model_copy(update={"log_format": "json", "log_level": "debug"})
    ingest = tally_process("ingest", settings, tmp_path).start()
    consumer = tally_process("consume", settings, tmp_path).start()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    try:
        events = oracle.make_events(random.Random(8), 10, int(time.time() * 1000))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ingest.port}", timeout=30) as http:
            response = await http.post("/v1/events", json={"events": events}, headers={"x-request-id": "trace-42"})
        assert response.status_code == 202 and response.headers["x-request-id"] == "trace-42"
        # Another producer's record that is no envelope: dead-lettered under its request id.
        await producer.start()
        await producer.send_and_wait(settings.topic, b"not an envelope", headers=[("tally-request-id", b"raw-9")])
        deadline = time.monotonic() + 30
        applied: list[dict[str, Any]] = []
        dead: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not (applied and dead):
            await asyncio.sleep(0.2)
            lines = json_lines(consumer)
            applied = [x for x in lines if "trace-42" in x.get("request_ids", [])]
            dead = [x for x in lines if x.get("request_id") == "raw-9"]
    finally:
        await producer.stop()
        consumer.stop()
        ingest.stop()
    assert len(applied) == 1 and applied[0]["msg"].startswith("applied ") and applied[0]["service"] == "consumer"
    assert len(dead) == 1 and dead[0]["level"] == "warning" and dead[0]["reason"] == "undecodable"
    assert dead[0]["msg"].startswith("dead-lettered 1 record(s)")
