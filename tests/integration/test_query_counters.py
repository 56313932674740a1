"""`GET /v1/ops/counters`: the console's rates, read over HTTP from real /metrics pages.

Targets here are a small Starlette app under uvicorn (a healthy page, a 500, a page that is
not Prometheus text, one that answers too late, one that sends its page a line at a time for
longer than the deadline) and a port nobody listens on, beside a real
`tally ingest` process's own /metrics: each is reported for what it is, and none delays the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from core import devstack
from core.settings import Settings
from query.counters import COUNTERS
from tests.conftest import serve
from tests.integration.query_support import query_api
from tests.processes import tally_process

pytestmark = pytest.mark.integration

PAGE = """# HELP tally_ingest_events_accepted_total Events durable in Kafka
# TYPE tally_ingest_events_accepted_total counter
tally_ingest_events_accepted_total 1200.0
tally_ingest_events_accepted_created 1.7e9
# TYPE tally_ingest_events_rejected_total counter
tally_ingest_events_rejected_total{reason="type"} 3.0
tally_ingest_events_rejected_total{reason="ts"} 4.0
# TYPE tally_consumer_events_applied_total counter
tally_consumer_events_applied_total 1190.0
# TYPE tally_http_requests_total counter
tally_http_requests_total{method="GET",route="/x",service="ingest",status="200"} 99.0
"""


async def good(request: Request) -> PlainTextResponse:
    return PlainTextResponse(PAGE, media_type="text/plain; version=0.0.4")


async def broken(request: Request) -> PlainTextResponse:
    return PlainTextResponse("oops", status_code=500)


async def garbage(request: Request) -> PlainTextResponse:
    return PlainTextResponse("tally_ingest_events_accepted_total one two three\n")


async def slow(request: Request) -> PlainTextResponse:
    await asyncio.sleep(5)
    return PlainTextResponse(PAGE)


async def trickle(request: Request) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:  # each read is quick; the whole page is not
        for line in PAGE.encode().splitlines(keepends=True):
            yield line
            await asyncio.sleep(0.3)

    return StreamingResponse(lines(), media_type="text/plain")


async def scrape(settings: Settings, targets: str, ingest: str, closed: int) -> tuple[httpx.Response, float]:
    async with httpx.AsyncClient(base_url=ingest) as http:  # one accepted and one rejected event
        r = await http.post("/v1/events", json={"events": [{"type": "purchase"}, {"type": "bad type"}]})
        assert r.status_code == 202 and r.json()["accepted"] == 1
    spec = ",".join([
        f"fake={targets}/good", f"ingest={ingest}/metrics", f"{targets}/broken", f"garbage={targets}/garbage",
        f"slow={targets}/slow", f"trickle={targets}/trickle", f"gone=http://127.0.0.1:{closed}/metrics",
    ])
    async with query_api(settings.model_copy(update={"metrics_targets": spec})) as http:
        started = time.monotonic()
        response = await http.get("/v1/ops/counters")
        return response, time.monotonic() - started


TARGETS = Starlette(routes=[Route("/good", good), Route("/broken", broken), Route("/garbage", garbage),
                            Route("/slow", slow), Route("/trickle", trickle)])


async def test_counters_are_summed_per_target_and_failures_named(migrated: Settings, tmp_path: Path) -> None:
    closed = devstack.free_port()
    process = tally_process("ingest", migrated, tmp_path).start()  # its own counters, from 0
    ingest = f"http://127.0.0.1:{process.port}"
    try:
        async with serve(TARGETS) as targets:
            response, took = await scrape(migrated, targets, ingest, closed)
    finally:
        process.stop()
    assert response.status_code == 200
    body = response.json()
    assert body["names"] == list(COUNTERS) and abs(body["at"] - time.time()) < 10
    zero = dict.fromkeys(COUNTERS, 0.0)
    assert body["sources"] == [
        {"name": "fake", "up": True, "error": None, "counters": {
            **zero, "tally_ingest_events_accepted_total": 1200.0, "tally_ingest_events_rejected_total": 7.0,
            "tally_consumer_events_applied_total": 1190.0}},
        {"name": "ingest", "up": True, "error": None, "counters": {
            **zero, "tally_ingest_events_accepted_total": 1.0, "tally_ingest_events_rejected_total": 1.0}},
        {"name": "target-3", "up": False, "error": "HTTP 500", "counters": {}},
        {"name": "garbage", "up": False, "error": "not Prometheus text", "counters": {}},
        {"name": "slow", "up": False, "error": "timed out", "counters": {}},
        {"name": "trickle", "up": False, "error": "timed out", "counters": {}},
        {"name": "gone", "up": False, "error": "ConnectError", "counters": {}},
    ]
    assert took < 3.0  # scraped in parallel, each within 1 s: the slow one is not waited for


async def test_no_targets_is_an_empty_list(migrated: Settings) -> None:
    async with query_api(migrated) as http:
        body = (await http.get("/v1/ops/counters")).json()
    assert body["sources"] == [] and body["names"] == list(COUNTERS)
