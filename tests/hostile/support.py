"""Shared by the hostile-input tests: a served app with its uvicorn server in reach, raw HTTP
over a socket (for what well-behaved clients cannot send), and the problem+json promise."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

PROBLEM_JSON = "application/problem+json"


async def until(check: Callable[[], Awaitable[bool]], *, within: float, what: str) -> float:
    """Poll `check` until it holds; the seconds it took. Fails with `what` after `within` seconds."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > within:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def ready(url: str, *, within: float = 20.0) -> None:
    """Wait until the app says it is ready (ingest connects to Kafka in the background)."""

    async def check() -> bool:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            return (await http.get("/readyz")).status_code == 200

    await until(check, within=within, what=f"{url}/readyz answers 200")


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after this response

    def json(self) -> Any:
        return orjson.loads(self.body)


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_response(reader: asyncio.StreamReader, *, within: float) -> RawResponse:
    """One HTTP/1.1 response (Content-Length framed), and whether the server then closed."""
    async with asyncio.timeout(within):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    try:
        async with asyncio.timeout(min(within, 2.0)):
            closed = await reader.read(1) == b""
    except TimeoutError:
        closed = False
    return RawResponse(int(status_line.split(" ")[1]), headers, body, closed)


async def raw_exchange(port: int, data: bytes, *, within: float = 10.0) -> RawResponse:
    """Send `data` as is on a fresh connection and read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_response(reader, within=within)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def assert_problem(status: int, content_type: str, body: bytes, *, expected: int | None = None) -> dict[str, Any]:
    """An error answer is RFC 9457: problem+json whose `status` is the HTTP status, with a title."""
    assert content_type.split(";")[0].strip() == PROBLEM_JSON, (status, content_type, body[:300])
    problem = orjson.loads(body)
    assert isinstance(problem, dict), problem
    assert problem["status"] == status, problem
    assert isinstance(problem["title"], str) and problem["title"], problem
    assert isinstance(problem["type"], str) and problem["type"], problem
    if expected is not None:
        assert status == expected, problem
    return problem


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])
