"""HTTP/2 under Granian: a real `tally ingest --server granian` takes batches from a real HTTP/2
client (httpx with h2) over h2c (prior knowledge, plain TCP) and over TLS (h2 chosen by ALPN),
HTTP/1.1 still on the same port, and what got the 202 is exactly what is in Kafka. uvicorn
speaks HTTP/1.1 only: the same client asking it for h2 over TLS gets HTTP/1.1."""

from __future__ import annotations

import asyncio
import re
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from core.settings import Settings
from tests.kafka_read import read_topic
from tests.processes import TallyProcess, tally_process

pytestmark = pytest.mark.integration

ACCEPTED = re.compile(r"^tally_ingest_events_accepted_total (\S+)$", re.M)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, made for this test (openssl)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


def batch(tag: str, n: int) -> list[dict[str, Any]]:
    return [{"type": f"{tag}.{i % 7}", "user_id": f"u{i}", "properties": {"i": i, "tag": tag}} for i in range(n)]


def sent_as_stored(events: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    return sorted((e["type"], e["user_id"], e["properties"]) for e in events)


def stored(records: list[tuple[dict[str, Any], dict[str, bytes]]], request_id: str) -> list[tuple[str, str, Any]]:
    return sorted((e["type"], e["user_id"], e["properties"]) for e, h in records
                  if h["tally-request-id"] == request_id.encode())


async def post(http: httpx.AsyncClient, events: list[dict[str, Any]], request_id: str) -> httpx.Response:
    return await http.post("/v1/events", content=orjson.dumps({"events": events}),
                           headers={"content-type": "application/json", "x-request-id": request_id})


def accepted(response: httpx.Response, http_version: str, count: int) -> None:
    assert (response.http_version, response.status_code, response.content) == (
        http_version, 202, b'{"accepted":%d,"rejected":[]}' % count)


async def in_kafka(settings: Settings, sent: dict[str, list[dict[str, Any]]]) -> None:
    """Exactly the events sent, by request id, and nothing else, are in the topic."""
    total = sum(len(events) for events in sent.values())
    records = await read_topic(str(settings.kafka_bootstrap), settings.topic, expect_events=total)
    assert len(records) == total
    for request_id, events in sent.items():
        assert stored(records, request_id) == sent_as_stored(events), request_id


def granian(settings: Settings, tmp: Path, *args: str) -> TallyProcess:
    return tally_process("ingest", settings, tmp, "--server", "granian", *args).start()


async def test_h2c_with_prior_knowledge_and_http1_on_the_same_port(migrated: Settings, tmp_path: Path) -> None:
    ingest = granian(migrated, tmp_path)
    h2_events, h1_events = batch("h2c", 100), batch("h1", 10)
    try:
        async with httpx.AsyncClient(base_url=ingest.url, http1=False, http2=True, timeout=30) as h2, \
                httpx.AsyncClient(base_url=ingest.url, timeout=30) as h1:
            answer = await post(h2, h2_events, "over-h2c")
            ready = await h2.get("/readyz")
            plain = await post(h1, h1_events, "over-h1")
            scrape = await h2.get("/metrics")
    finally:
        assert ingest.stop() == 0, ingest.log()[-3000:]  # Granian exits 0 after a graceful stop
    accepted(answer, "HTTP/2", 100)
    assert answer.headers["x-request-id"] == "over-h2c" and answer.headers["content-type"] == "application/json"
    assert (ready.http_version, ready.status_code, ready.json()["ready"]) == ("HTTP/2", 200, True)
    accepted(plain, "HTTP/1.1", 10)
    assert scrape.status_code == 200 and ACCEPTED.search(scrape.text).group(1) == "110.0"  # type: ignore[union-attr]
    await in_kafka(migrated, {"over-h2c": h2_events, "over-h1": h1_events})


async def test_tls_chooses_h2_by_alpn(migrated: Settings, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    settings = migrated.model_copy(update={"tls_cert_file": cert, "tls_key_file": key})
    ingest = granian(settings, tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    h2_events, h1_events = batch("tls-h2", 100), batch("tls-h1", 5)
    try:
        async with httpx.AsyncClient(base_url=ingest.url, http2=True, verify=trust, timeout=30) as h2, \
                httpx.AsyncClient(base_url=ingest.url, verify=trust, timeout=30) as h1:
            answer = await post(h2, h2_events, "over-h2")
            plain = await post(h1, h1_events, "over-tls-h1")  # a client that offers only http/1.1 gets it
    finally:
        assert ingest.stop() == 0, ingest.log()[-3000:]
    assert ingest.url.startswith("https://")
    accepted(answer, "HTTP/2", 100)
    accepted(plain, "HTTP/1.1", 5)
    await in_kafka(migrated, {"over-h2": h2_events, "over-tls-h1": h1_events})


async def test_uvicorn_serves_tls_over_http1_only(migrated: Settings, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    settings = migrated.model_copy(update={"tls_cert_file": cert, "tls_key_file": key})
    ingest = tally_process("ingest", settings, tmp_path, "--server", "uvicorn").start()
    events = batch("uvicorn-tls", 20)
    try:
        trust = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(base_url=ingest.url, http2=True, verify=trust, timeout=30) as http:
            answer = await post(http, events, "asked-for-h2")
    finally:
        ingest.stop()
    accepted(answer, "HTTP/1.1", 20)
    assert "server" not in answer.headers
    await in_kafka(migrated, {"asked-for-h2": events})


async def test_granian_workers_do_not_outlive_a_killed_supervisor(migrated: Settings, tmp_path: Path) -> None:
    ingest = granian(migrated, tmp_path, "--workers", "2")
    ingest.kill()  # SIGKILL to the supervisor only: its workers are told by the kernel (core.servers)
    deadline = time.monotonic() + 15
    while True:
        try:
            async with httpx.AsyncClient(timeout=1) as http:
                await http.get(f"{ingest.url}/healthz")
        except httpx.TransportError:
            break
        assert time.monotonic() < deadline, "an orphaned Granian worker is still serving"
        await asyncio.sleep(0.1)
