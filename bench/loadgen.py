"""A minimal keep-alive HTTP/1.1 load generator on raw asyncio streams.

httpx costs more CPU per request than the server under test on this 2-core
machine; this client costs a few microseconds, so the figure is the server's.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, p: float) -> float:
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(len(data) * p))] if data else float("nan")


async def _connection(
    host: str, port: int, path: str, bodies: list[bytes], headers: bytes, deadline: float, result: LoadResult
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = 0
    try:
        while time.perf_counter() < deadline:
            body = bodies[i % len(bodies)]
            i += 1
            start = time.perf_counter()
            writer.write(
                b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + headers
                + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            result.latencies.append(time.perf_counter() - start)
            status = int(status_line.split(b" ", 2)[1])
            result.statuses[status] = result.statuses.get(status, 0) + 1
            result.requests += 1
    finally:
        writer.close()


async def run_load(
    host: str, port: int, path: str, bodies: list[bytes], *, seconds: float, connections: int,
    content_type: str = "application/json",
) -> LoadResult:
    result = LoadResult()
    headers = f"Content-Type: {content_type}\r\n".encode()
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(
        _connection(host, port, path, bodies, headers, deadline, result) for _ in range(connections)
    ))
    result.seconds = time.perf_counter() - start
    return result
