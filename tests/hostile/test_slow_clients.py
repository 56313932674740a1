"""Slow-loris and header abuse against the real ingest app under uvicorn (httptools, as in
production): stalled and trickling bodies are cut off at TALLY_BODY_TIMEOUT_SECONDS with a 408
while other clients are served; huge headers, lying Content-Lengths and malformed or
smuggling-shaped framing are refused; none of them writes anything to Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest
import uvicorn

from core.settings import Settings
from ingest.app import create_app
from tests.conftest import serving
from tests.hostile.support import (
    assert_problem,
    port_of,
    raw_exchange,
    read_response,
    ready,
    request_head,
    until,
)
from tests.kafka_read import read_topic

pytestmark = pytest.mark.integration

BODY_TIMEOUT = 1.5
STALLED = 50


def good_batch(n: int = 3) -> list[dict[str, Any]]:
    return [{"type": "hostile.ok", "event_id": str(uuid.uuid4()), "properties": {"i": i}} for i in range(n)]


def json_head(length: int, **extra: str) -> bytes:
    return request_head(
        "POST", "/v1/events", {"Content-Type": "application/json", "Content-Length": str(length), **extra}
    )


@pytest.fixture
def hostile_settings(migrated: Settings) -> Settings:
    return migrated.model_copy(update={"body_timeout_seconds": BODY_TIMEOUT})


async def kafka_ids(settings: Settings, expect: int) -> list[str]:
    events = await read_topic(str(settings.kafka_bootstrap), settings.topic, expect_events=expect)
    return sorted(e["event_id"] for e, _ in events)


async def test_stalled_bodies_are_cut_off_while_others_are_served(hostile_settings: Settings) -> None:
    settings = hostile_settings
    accepted: list[str] = []
    async with serving(create_app(settings)) as (url, server):
        await ready(url)
        port = port_of(url)
        stalled = []
        for _ in range(STALLED):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(json_head(1000) + b'{"events": [{"type": "never.finished", ')
            stalled.append((reader, writer, time.monotonic()))
        try:
            await stalled_then_served(url, server, stalled, accepted)
        finally:
            for _, writer, _ in stalled:
                writer.close()
    assert await kafka_ids(settings, len(accepted)) == sorted(accepted)  # nothing from a partial body


async def stalled_then_served(
    url: str,
    server: uvicorn.Server,
    stalled: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]],
    accepted: list[str],
) -> None:
    await asyncio.gather(*(w.drain() for _, w, _ in stalled))
    await until(
        lambda: _true(len(server.server_state.connections) >= STALLED),
        within=5,
        what="the server holds every stalled connection",
    )

    # While 50 clients hang mid-body, another one is answered at once.
    batch = good_batch()
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        started = time.monotonic()
        response = await http.post("/v1/events", json={"events": batch})
        answered_in = time.monotonic() - started
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 3, "rejected": []}
    assert answered_in < 1.0, answered_in
    accepted += [e["event_id"] for e in batch]

    # Each stalled client gets a 408 problem at the deadline, and its connection is closed.
    answers = await asyncio.gather(*(read_response(r, within=BODY_TIMEOUT + 10) for r, _, _ in stalled))
    finished = time.monotonic()
    for (_, writer, _), answer in zip(stalled, answers, strict=True):
        writer.close()
        problem = assert_problem(answer.status, answer.headers["content-type"], answer.body, expected=408)
        assert "TALLY_BODY_TIMEOUT_SECONDS" in problem["detail"], problem
        assert answer.closed, answer
    slowest = max(finished - opened for _, _, opened in stalled)
    assert slowest < BODY_TIMEOUT + 8, slowest  # cut off at the deadline, not whenever the client gives up
    await until(
        lambda: _true(len(server.server_state.connections) == 0),
        within=5,
        what="the stalled connections are gone from the server",
    )

    # The service is unharmed: the next batch is accepted as usual.
    batch = good_batch()
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        after = await http.post("/v1/events", json=batch)
    assert after.status_code == 202, after.text
    accepted += [e["event_id"] for e in batch]


async def test_a_trickle_is_cut_at_the_deadline_not_kept_alive(hostile_settings: Settings) -> None:
    """One byte every 0.2 s would satisfy an idle timer forever; the deadline is for the whole body."""
    settings = hostile_settings
    async with serving(create_app(settings)) as (url, _):
        await ready(url)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
        writer.write(json_head(10_000) + b"[")
        started = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(OSError):
                while True:
                    await asyncio.sleep(0.2)
                    writer.write(b" ")
                    await writer.drain()

        dripping = asyncio.create_task(trickle())
        try:
            answer = await read_response(reader, within=BODY_TIMEOUT + 10)
        finally:
            dripping.cancel()
            writer.close()
        took = time.monotonic() - started
    assert_problem(answer.status, answer.headers["content-type"], answer.body, expected=408)
    assert BODY_TIMEOUT - 0.2 < took < BODY_TIMEOUT + 8, took
    assert answer.closed


async def test_huge_headers_are_refused_without_harm(hostile_settings: Settings) -> None:
    settings = hostile_settings
    batch = good_batch()
    body = orjson.dumps(batch)
    async with serving(create_app(settings)) as (url, _):
        await ready(url)
        port = port_of(url)
        for size in (100 * 1024, 1024 * 1024):
            head = json_head(len(body), **{"X-Pad": "a" * size})
            answer = await raw_exchange(port, head + body)
            assert answer.status in (400, 431), answer
            if answer.status == 431:
                problem = assert_problem(431, answer.headers["content-type"], answer.body)
                assert "TALLY_MAX_HEADER_BYTES" in problem["detail"], problem
            assert answer.closed
        # Many ordinary headers adding up past the limit are the same thing.
        many = {f"X-H{i}": "v" * 100 for i in range(400)}
        answer = await raw_exchange(port, json_head(len(body), **many) + body)
        assert answer.status == 431, answer
        # Headers within the limit still pass, and the next request is served.
        answer = await raw_exchange(port, json_head(len(body), **{"X-Pad": "a" * 8 * 1024}) + body)
        assert answer.status == 202, answer
        assert answer.json() == {"accepted": 3, "rejected": []}
    assert await kafka_ids(settings, 3) == sorted(str(e["event_id"]) for e in batch)  # only the last one


async def test_content_length_lies_are_refused_or_timed_out(hostile_settings: Settings) -> None:
    settings = hostile_settings
    kept = good_batch(2)
    async with serving(create_app(settings)) as (url, _):
        await ready(url)
        port = port_of(url)

        # Longer than the body, which then stops: timed out, never accepted.
        body = orjson.dumps(good_batch())
        started = time.monotonic()
        answer = await raw_exchange(port, json_head(len(body) + 100) + body, within=BODY_TIMEOUT + 10)
        assert_problem(answer.status, answer.headers["content-type"], answer.body, expected=408)
        assert time.monotonic() - started < BODY_TIMEOUT + 8

        # Longer than the body, and the client shuts its side: no answer to read, nothing written.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(json_head(len(body) + 100) + body)
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(BODY_TIMEOUT + 10):
            rest = await reader.read()
        writer.close()
        assert not rest.startswith(b"HTTP/1.1 2"), rest[:200]

        # Shorter than a JSON body, all in one segment: the truncated body is not JSON and the
        # bytes after it are not a request; either refusal is a 400 (whichever uvicorn sends first).
        answer = await raw_exchange(port, json_head(len(body) - 7) + body)
        assert answer.status == 400, answer
        if answer.headers["content-type"] == "application/problem+json":
            assert "not valid JSON" in answer.json()["detail"], answer
        assert answer.closed

        # The same, with the extra bytes sent after the answer: the app's own 400 problem first.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(json_head(len(body) - 7) + body[:-7])
        answer = await read_response(reader, within=10)
        problem = assert_problem(answer.status, answer.headers["content-type"], answer.body, expected=400)
        assert "not valid JSON" in problem["detail"], problem
        writer.write(body[-7:])  # not an HTTP request: refused by uvicorn's parser, connection closed
        with contextlib.suppress(OSError):
            await writer.drain()
            async with asyncio.timeout(10):
                rest = await reader.read()
            assert rest.startswith(b"HTTP/1.1 400"), rest[:200]
        writer.close()

        # Shorter than an NDJSON body, cutting its last line: that line is refused by index, the
        # complete lines before it are accepted (they are what the client sent). The rest of the
        # line follows the answer (sent with it, uvicorn's 400 for those bytes may close the
        # connection before the 202 is written: the client could not know what was kept).
        lines = [orjson.dumps(e) for e in [*kept, *good_batch(1)]]
        nd = b"\n".join(lines)
        cut = len(nd) - len(lines[-1]) // 2
        head = request_head("POST", "/v1/events", {"Content-Type": "application/x-ndjson", "Content-Length": str(cut)})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + nd[:cut])
        answer = await read_response(reader, within=10)
        writer.close()
        assert answer.status == 202, answer
        result = answer.json()
        assert result["accepted"] == 2
        assert [r["index"] for r in result["rejected"]] == [2], result
        assert "not valid JSON" in result["rejected"][0]["error"]

        # A Content-Length over the body limit is refused before a byte of the body is read.
        started = time.monotonic()
        answer = await raw_exchange(port, json_head(settings.max_body_bytes + 1))
        assert time.monotonic() - started < 2.0
        problem = assert_problem(answer.status, answer.headers["content-type"], answer.body, expected=413)
        assert str(settings.max_body_bytes) in problem["detail"], problem
        assert answer.closed

        # The service is unharmed.
        last = good_batch(1)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            ok = await http.post("/v1/events", json=last)
        assert ok.status_code == 202, ok.text
    assert await kafka_ids(settings, 3) == sorted(str(e["event_id"]) for e in [*kept, *last])


async def _true(value: bool) -> bool:
    return value


MALFORMED = {
    "length not a number": b"Content-Length: abc\r\n",
    "negative length": b"Content-Length: -1\r\n",
    "length with a sign": b"Content-Length: +{n}\r\n",
    "length past 64 bits": b"Content-Length: 99999999999999999999999\r\n",
    "two lengths": b"Content-Length: {n}\r\nContent-Length: {m}\r\n",
    "length and chunked": b"Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n",
    "chunked not last": b"Transfer-Encoding: chunked, gzip\r\n",
    "NUL in a header value": b"X-Evil: a\x00b\r\nContent-Length: {n}\r\n",
    "space in a header name": b"X Evil: a\r\nContent-Length: {n}\r\n",
    "folded header line": b"X-Evil: a\r\n  folded\r\nContent-Length: {n}\r\n",
    "bare LF line ends": b"Content-Length: {n}\nX-Evil: a\n",
}


async def test_malformed_framing_is_refused_and_writes_nothing(hostile_settings: Settings) -> None:
    """Framing that a proxy and the server could read differently (the stuff of request smuggling)
    is a 400 from the HTTP parser, the connection is closed, and nothing reaches Kafka."""
    settings = hostile_settings
    body = orjson.dumps(good_batch(2))
    last = good_batch(1)
    wrong: dict[str, object] = {}
    async with serving(create_app(settings)) as (url, _):
        await ready(url)
        for case, head in MALFORMED.items():
            head = head.replace(b"{n}", str(len(body)).encode()).replace(b"{m}", str(len(body) - 5).encode())
            data = b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + head + b"\r\n" + body
            answer = await raw_exchange(port_of(url), data)
            if answer.status != 400 or not answer.closed:
                wrong[case] = answer
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            ok = await http.post("/v1/events", json=last)
    assert wrong == {}
    assert ok.status_code == 202, ok.text
    assert await kafka_ids(settings, 1) == [last[0]["event_id"]]
