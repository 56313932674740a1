"""A pipelined Redis reader for one hot command: the cache hit's MGET of an entry and its version.

redis-py spends ~50 µs of CPU on every command (pool checkout, retry wrapper, health check,
per-call timeouts) where writing the command and parsing the reply take ~8 µs
(docs/performance.md). That was a quarter of a cache hit. A hit needs one read-only command,
so it gets this: a few connections on which requests are pipelined (Redis answers each
connection's commands in order), so concurrency needs no checkout and no lock. Everything
else (writes, locks, scripts, the consumers' bumps) stays on redis-py.

Failure is simple on purpose: a reply that does not come within the timeout, a closed
socket or a protocol error aborts that connection and fails every request waiting on it
(the caller falls back to Postgres); the next request connects again.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any

from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection, parse_url
from redis.exceptions import ResponseError

Reply = bytes | int | None | list[Any] | str


class ProtocolError(ConnectionError):
    """The server sent something that is not RESP: the connection cannot be trusted any more."""


def command(*parts: bytes | str) -> bytes:
    """A RESP array of bulk strings: how every command is sent."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)


def parse(buf: bytes | bytearray, pos: int = 0) -> tuple[Reply | ResponseError, int] | None:
    """One RESP2 reply from `buf[pos:]` and where it ends, or None while it is incomplete. Pure.

    Error replies come back as ResponseError values (they answer one command; the connection
    is fine); anything unparseable raises ProtocolError.
    """
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, line = buf[pos : pos + 1], bytes(buf[pos + 1 : end])
    after = end + 2
    try:
        if kind == b"$":
            size = int(line)
            if size < 0:
                return None, after
            if len(buf) < after + size + 2:
                return None
            return bytes(buf[after : after + size]), after + size + 2
        if kind == b"*":
            count = int(line)
            if count < 0:
                return None, after
            items: list[Any] = []
            for _ in range(count):
                item = parse(buf, after)
                if item is None:
                    return None
                value, after = item
                items.append(value)
            return items, after
        if kind == b"+":
            return line.decode(), after
        if kind == b":":
            return int(line), after
        if kind == b"-":
            return ResponseError(line.decode(errors="replace")), after
    except ValueError as exc:
        raise ProtocolError(f"unreadable reply {bytes(buf[pos:end])[:40]!r}") from exc
    raise ProtocolError(f"unknown reply type {bytes(kind)!r}")


class _Connection(asyncio.Protocol):
    """One socket: requests written in order, replies handed to their waiters in the same order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Reply]] = deque()
        self.buffer = bytearray()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        pos = 0
        try:
            while self.waiting and pos < len(self.buffer):
                parsed = parse(self.buffer, pos)
                if parsed is None:
                    break
                reply, pos = parsed
                waiter = self.waiting.popleft()
                if waiter.done():  # its caller gave up (cancelled): the reply is dropped
                    continue
                if isinstance(reply, ResponseError):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
        except ProtocolError as exc:
            self.abort(exc)
            return
        del self.buffer[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.abort(ConnectionError(f"Redis closed the connection: {exc}" if exc else "Redis closed the connection"))

    def abort(self, exc: Exception) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_exception(exc)

    def send(self, request: bytes) -> asyncio.Future[Reply]:
        if self.transport is None or self.lost:
            raise ConnectionError("the Redis connection is closed")
        waiter: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        self.transport.write(request)
        return waiter


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect, from a redis:// rediss:// or unix:// URL (parsed as redis-py does)."""

    host: str
    port: int
    path: str | None
    tls: ssl.SSLContext | None
    setup: tuple[bytes, ...]  # AUTH and SELECT, as the URL asks

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        options = parse_url(url)
        kind = options.get("connection_class")
        tls = None
        if kind is SSLConnection:
            tls = ssl.create_default_context()
            if options.get("ssl_cert_reqs") in ("none", ssl.CERT_NONE):
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
        setup: list[bytes] = []
        if options.get("password"):
            user = options.get("username")
            setup.append(command("AUTH", *([user] if user else []), options["password"]))
        if int(options.get("db", 0)):
            setup.append(command("SELECT", str(int(options["db"]))))
        path = options.get("path") if kind is UnixDomainSocketConnection else None
        return cls(str(options.get("host", "localhost")), int(options.get("port", 6379)), path, tls, tuple(setup))


class RedisReader:
    """`mget` over `connections` pipelined connections, each bounded by `timeout` seconds."""

    def __init__(self, endpoint: Endpoint, *, connections: int = 2, timeout: float = 0.5) -> None:
        self._endpoint = endpoint
        self._timeout = timeout
        self._slots: list[_Connection | None] = [None] * connections
        self._connecting: list[asyncio.Task[_Connection] | None] = [None] * connections
        self._next = 0

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisReader:
        return cls(Endpoint.from_url(url), **options)

    async def mget(self, *keys: str) -> list[bytes | None]:
        reply = await self.execute(command("MGET", *keys))
        if not isinstance(reply, list):
            raise ProtocolError(f"MGET answered {type(reply).__name__}")
        return reply

    async def execute(self, request: bytes) -> Reply:
        """Send one encoded command; its reply. ConnectionError/TimeoutError when Redis fails."""
        slot = self._next
        self._next = (slot + 1) % len(self._slots)
        conn = self._slots[slot]
        if conn is None or conn.lost:
            conn = await self._connect(slot)
        waiter = conn.send(request)
        try:
            async with asyncio.timeout(self._timeout):
                return await waiter
        except TimeoutError:
            # The replies on this socket are late, so every request behind this one is too.
            conn.abort(TimeoutError(f"Redis did not answer within {self._timeout:g} s"))
            raise

    async def _connect(self, slot: int) -> _Connection:
        task = self._connecting[slot]
        if task is None or task.done():
            task = self._connecting[slot] = asyncio.create_task(self._open())
        conn = await asyncio.shield(task)
        self._slots[slot] = conn
        return conn

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        endpoint = self._endpoint
        async with asyncio.timeout(self._timeout):
            if endpoint.path is not None:
                _, conn = await loop.create_unix_connection(_Connection, endpoint.path)
            else:
                _, conn = await loop.create_connection(_Connection, endpoint.host, endpoint.port, ssl=endpoint.tls)
            for request in endpoint.setup:
                reply = await conn.send(request)
                if reply != "OK":
                    conn.abort(ConnectionError("Redis refused the connection's setup"))
                    raise ConnectionError(f"Redis answered {reply!r} to the connection's setup")
        return conn

    async def close(self) -> None:
        for task in self._connecting:
            if task is not None and not task.done():
                task.cancel()
        for conn in self._slots:
            if conn is not None and conn.transport is not None:
                conn.transport.close()
        self._slots = [None] * len(self._slots)
