"""A small keep-alive HTTP/1.1 client on asyncio streams, for the soak's steady traffic.

httpx costs about a millisecond of CPU per request, more than Tally's ingest spends on a
batch (bench/loadgen.py says the same), and its pool gets slower with many waiters; on a
shared 2-core machine the soak's client would then be what falls behind. This one
writes a request and reads the status line, headers and a Content-Length (or chunked)
body: a few tens of microseconds per request.

It never retries: a request either gets its answer or raises (the soak counts that as a
connection error). Idle connections are reused newest first and dropped after IDLE_SECONDS,
well before uvicorn's 5 s keep-alive timeout, so a request is never written to a
connection the server is closing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson

IDLE_SECONDS = 3.0


class ClientError(Exception):
    """No complete answer: the connection failed, closed early, or the deadline passed."""


@dataclass(frozen=True)
class Answer:
    status_code: int
    headers: dict[str, str]  # names in lower case
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return orjson.loads(self.content)


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Client:
    def __init__(self, port: int, *, connections: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self._slots = asyncio.Semaphore(connections)
        self._idle: list[tuple[float, Connection]] = []  # newest last

    async def get(self, path: str, params: dict[str, str] | None = None,
                  headers: dict[str, str] | None = None) -> Answer:
        return await self.request("GET", f"{path}?{urlencode(params)}" if params else path, b"", headers or {})

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> Answer:
        return await self.request("POST", path, body, headers)

    async def request(self, method: str, target: str, body: bytes, headers: dict[str, str]) -> Answer:
        async with self._slots:
            conn = await self._connection()
            try:
                async with asyncio.timeout(self.timeout):
                    answer = await self._exchange(conn, method, target, body, headers)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as exc:
                conn[1].close()
                raise ClientError(f"{type(exc).__name__}: {exc}") from exc
            if answer.headers.get("connection", "").lower() == "close":
                conn[1].close()
            else:
                self._idle.append((time.monotonic(), conn))
            return answer

    async def close(self) -> None:
        for _, (_, writer) in self._idle:
            writer.close()
        self._idle.clear()

    async def _connection(self) -> Connection:
        while self._idle:
            since, conn = self._idle.pop()
            if time.monotonic() - since < IDLE_SECONDS and not conn[0].at_eof():
                return conn
            conn[1].close()
        try:
            return await asyncio.open_connection("127.0.0.1", self.port)
        except OSError as exc:
            raise ClientError(f"connect: {exc}") from exc

    async def _exchange(self, conn: Connection, method: str, target: str, body: bytes,
                        headers: dict[str, str]) -> Answer:
        reader, writer = conn
        head = [f"{method} {target} HTTP/1.1", f"host: 127.0.0.1:{self.port}", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        got: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                got[name.strip().lower()] = value.strip()
        if got.get("transfer-encoding", "").lower() == "chunked":
            content = await _chunked(reader)
        else:
            content = await reader.readexactly(int(got.get("content-length", "0")))
        return Answer(status, got, content)


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers are expected
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
