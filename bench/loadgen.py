"""A keep-alive HTTP/1.1 load generator on asyncio Protocols and uvloop, run in its own
process(es), that reports the CPU it used so that a saturated client shows.

httpx costs more CPU per request than the server under test on this 2-core machine; a
Protocol-level client with pre-built requests costs a few microseconds per request (no
stream readers, no header dicts: it looks for the end of the headers and Content-Length
only), so the figure is the server's. Each load process reports its own user + system
CPU; `LoadResult.cpu_percent` is their sum as a percentage of one core, printed beside
every HTTP phase.

Closed loop (`run_load`): `connections` connections each send the next request as soon as
the previous answer is complete. Open loop (`paced=` requests/s): each connection sends on
its own schedule, whatever the answers take (a late answer delays only that connection's
next request, counted in `LoadResult.late`).

Requests completing during the first `warmup` seconds are not counted.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import pickle
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import uvloop

from bench.procs import CpuMeter

REPO = Path(__file__).resolve().parent.parent


@dataclass
class LoadResult:
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0  # the measured window (after the warm-up)
    cpu_seconds: float = 0.0  # the load processes' own CPU, warm-up included
    wall_seconds: float = 0.0  # warm-up included
    processes: int = 1
    late: int = 0
    watched: dict[str, float] = field(default_factory=dict)  # CPU % of a core of the watched processes

    def percentile(self, p: float) -> float:
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(len(data) * p))] if data else float("nan")

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else float("nan")

    def ok(self, status: int) -> int:
        return self.statuses.get(status, 0)

    @property
    def cpu_percent(self) -> float:
        """The load generator's CPU, as a percentage of one core."""
        return 100 * self.cpu_seconds / self.wall_seconds if self.wall_seconds else float("nan")

    def merge(self, other: LoadResult) -> None:
        self.requests += other.requests
        for k, v in other.statuses.items():
            self.statuses[k] = self.statuses.get(k, 0) + v
        self.latencies.extend(other.latencies)
        self.seconds = max(self.seconds, other.seconds)
        self.wall_seconds = max(self.wall_seconds, other.wall_seconds)
        self.cpu_seconds += other.cpu_seconds
        self.late += other.late
        self.watched = self.watched or other.watched


def build_requests(host: str, port: int, path: str, bodies: Sequence[bytes], content_type: str,
                   extra_headers: str = "") -> list[bytes]:
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n{extra_headers}"
    return [head.encode() + b"Content-Length: " + str(len(b)).encode() + b"\r\n\r\n" + b for b in bodies]


@dataclass
class _Clock:
    deadline: float  # moved forward to now by a stop request


class _Client(asyncio.Protocol):
    def __init__(self, requests: list[bytes], offset: int, measure_from: float, clock: _Clock,
                 result: LoadResult, done: asyncio.Future[None], schedule: tuple[float, float] | None) -> None:
        self._requests = requests
        self._i = offset
        self._measure_from = measure_from
        self._clock = clock
        self._result = result
        self._done = done
        self._buf = b""
        self._need = -1
        self._status = 0
        self._sent_at = 0.0
        self._schedule = schedule  # (next send time, interval) when paced
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._next()

    def _next(self) -> None:
        now = time.perf_counter()
        if now >= self._clock.deadline:
            assert self._transport is not None
            self._transport.close()
            return
        if self._schedule is not None:
            at, interval = self._schedule
            self._schedule = (at + interval, interval)
            if at > now:
                self._loop.call_later(at - now, self._send)
                return
            if now - at > interval:
                self._result.late += 1
        self._send()

    def _send(self) -> None:
        assert self._transport is not None
        if time.perf_counter() >= self._clock.deadline:  # a paced send, due after a stop
            self._transport.close()
            return
        request = self._requests[self._i % len(self._requests)]
        self._i += 1
        self._sent_at = time.perf_counter()
        self._transport.write(request)

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except Exception as exc:
            if not self._done.done():
                self._done.set_exception(exc)
            assert self._transport is not None
            self._transport.abort()

    def _received(self, data: bytes) -> None:
        self._buf += data
        while True:
            if self._need < 0:
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self._buf[:end].lower()
                self._status = int(head[9:12])
                at = head.find(b"\r\ncontent-length:")
                if at < 0:
                    raise RuntimeError(f"a response without Content-Length: {head[:300]!r}")
                eol = head.find(b"\r\n", at + 17)
                length = int(head[at + 17 : eol if eol >= 0 else len(head)])
                self._need = end + 4 + length
            if len(self._buf) < self._need:
                return
            self._buf = self._buf[self._need :]
            self._need = -1
            now = time.perf_counter()
            if now >= self._measure_from:
                r = self._result
                r.latencies.append(now - self._sent_at)
                r.statuses[self._status] = r.statuses.get(self._status, 0) + 1
                r.requests += 1
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            if exc is None and time.perf_counter() >= self._clock.deadline:
                self._done.set_result(None)
            else:
                self._done.set_exception(exc or ConnectionError("the server closed the connection"))


async def _load(host: str, port: int, requests: list[bytes], *, seconds: float, warmup: float, connections: int,
                paced: float | None, first_connection: int, total_connections: int, ramp: float,
                watch: dict[str, int] | None, watch_descendants: bool) -> LoadResult:
    loop = asyncio.get_running_loop()
    result = LoadResult()
    start = time.perf_counter()
    measure_from = start + warmup
    clock = _Clock(measure_from + seconds)

    def stop() -> None:
        clock.deadline = min(clock.deadline, time.perf_counter())

    loop.add_signal_handler(signal.SIGUSR1, stop)
    futures = []
    for k in range(connections):
        if ramp and k:  # connections arrive one after another, while the first ones already load the server
            await asyncio.sleep(max(0.0, start + ramp * k - time.perf_counter()))
        done: asyncio.Future[None] = loop.create_future()
        schedule = None
        if paced:
            interval = total_connections / paced
            schedule = (start + interval * (first_connection + k) / total_connections, interval)
        await loop.create_connection(
            lambda done=done, k=k, schedule=schedule: _Client(  # type: ignore[misc]
                requests, (first_connection + k) * 7, measure_from, clock, result, done, schedule
            ),
            host, port,
        )
        futures.append(done)
    watched: dict[str, float] = {}
    if watch:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        meter = CpuMeter(dict(watch), descendants=watch_descendants)
        meter.start()
    await asyncio.gather(*futures)
    if watch:
        watched = meter.stop()
    result.seconds = time.perf_counter() - measure_from
    result.watched = watched
    return result


def _serve() -> None:
    """`python -m bench.loadgen`: jobs (the arguments of `_load`) come pickled on stdin, each
    preceded by its length; each LoadResult goes back the same way on stdout. Runs until stdin
    closes, so one process serves every phase of a benchmark (no start-up per phase)."""
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a stop between jobs stops nothing
        head = inp.read(8)
        if len(head) < 8:
            return
        args = pickle.loads(inp.read(int.from_bytes(head, "big")))  # noqa: S301 - from the parent process
        usage = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                result = runner.run(_load(**args))
        except Exception as exc:
            payload: tuple[str, Any] = ("error", repr(exc))
        else:
            after = resource.getrusage(resource.RUSAGE_SELF)
            result.cpu_seconds = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
            result.wall_seconds = time.perf_counter() - t0
            payload = ("ok", result)
        data = pickle.dumps(payload)
        out.write(len(data).to_bytes(8, "big") + data)
        out.flush()


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


_IDLE: list[subprocess.Popen[bytes]] = []  # load processes waiting for their next job


def _read_exact(fd: int, n: int, deadline: float) -> bytes | None:
    """`n` bytes from `fd` (fewer only at end of file), or None if the deadline passes first."""
    chunks: list[bytes] = []
    got = 0
    while got < n:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return None
        chunk = os.read(fd, n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _take() -> subprocess.Popen[bytes]:
    while _IDLE:
        worker = _IDLE.pop()
        if worker.poll() is None:
            return worker
    return subprocess.Popen([sys.executable, "-m", "bench.loadgen"], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, preexec_fn=_die_with_parent)


@atexit.register
def _close_idle() -> None:
    while _IDLE:
        worker = _IDLE.pop()
        with contextlib.suppress(OSError):
            assert worker.stdin is not None
            worker.stdin.close()
        try:
            worker.wait(5)
        except subprocess.TimeoutExpired:
            worker.kill()


class Load:
    """A load running in its own processes (`python -m bench.loadgen`, so they import nothing of
    the caller's and inherit no loop, thread or socket; kept for the next load once done):
    `stop()` ends it early, `result()` waits for it."""

    def __init__(
        self, host: str, port: int, path: str, bodies: Sequence[bytes], *, seconds: float, connections: int,
        content_type: str = "application/json", warmup: float = 0.0, processes: int | None = None,
        paced: float | None = None, headers: dict[str, str] | None = None, ramp: float | None = None,
        watch: dict[str, int] | None = None, watch_descendants: bool = True,
    ) -> None:
        if ramp is None:
            ramp = min(0.05, warmup / 2 / connections)
        processes = processes or max(1, min(os.cpu_count() or 1, (connections + 31) // 32))
        self.processes = processes = min(processes, connections)
        self._timeout = warmup + seconds + 60
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        requests = build_requests(host, port, path, bodies, content_type, extra)
        self._workers: list[subprocess.Popen[bytes]] = []
        first = 0
        for i in range(processes):
            share = connections // processes + (1 if i < connections % processes else 0)
            args = {"host": host, "port": port, "requests": requests, "seconds": seconds, "warmup": warmup,
                    "connections": share, "paced": paced, "first_connection": first,
                    "total_connections": connections, "ramp": ramp * processes, "watch": watch if i == 0 else None,
                    "watch_descendants": watch_descendants}
            first += share
            worker = _take()
            assert worker.stdin is not None
            data = pickle.dumps(args)
            worker.stdin.write(len(data).to_bytes(8, "big") + data)
            worker.stdin.flush()
            self._workers.append(worker)

    def stop(self) -> None:
        for worker in self._workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGUSR1)

    def _read(self, worker: subprocess.Popen[bytes]) -> tuple[str, Any]:
        assert worker.stdout is not None
        deadline = time.monotonic() + self._timeout
        fd = worker.stdout.fileno()  # read raw, with one deadline for the whole frame: never hang
        head = _read_exact(fd, 8, deadline)
        if head is None or len(head) < 8:
            return "error", "no result within the phase's time and a minute" if head is None else "exited"
        body = _read_exact(fd, int.from_bytes(head, "big"), deadline)
        if body is None:
            return "error", "a partial result: no more bytes within the phase's time and a minute"
        return pickle.loads(body)  # type: ignore[no-any-return]  # noqa: S301

    def result(self) -> LoadResult:
        total = LoadResult(processes=self.processes)
        errors = []
        for worker in self._workers:
            kind, value = self._read(worker)
            if kind == "ok":
                total.merge(value)
                if worker not in _IDLE:  # never listed twice: two jobs on one process would cross their results
                    _IDLE.append(worker)
            else:
                errors.append(value)
                worker.kill()
                worker.wait()
        if errors:
            raise RuntimeError(f"load generator failed: {errors[0]}")
        return total


def run_load(host: str, port: int, path: str, bodies: Sequence[bytes], **options: Any) -> LoadResult:
    """Load `path` with POSTs of `bodies` (in turn) from separate processes (default: one per
    32 connections); blocks until done. Options (keyword): `seconds`, `connections` (required);
    `warmup`; `paced`: total requests/s (open loop); `content_type`, `headers`; `processes`.

    `ramp`: seconds between connections (default: spread over the first half of the warm-up, at
    most 50 ms apart). All at once, the connections all land on whichever server worker
    accepts first (uvicorn's workers share one listening socket); one after another, while the
    first ones keep a worker busy, they spread over the workers as they would in production.

    `watch`: processes whose CPU over the measured window (after the warm-up) is reported in
    `LoadResult.watched`, each with its descendants unless `watch_descendants` is false."""
    return Load(host, port, path, bodies, **options).result()


if __name__ == "__main__":
    from bench import loadgen  # the module by its name, so that the LoadResult pickled is bench.loadgen's

    loadgen._serve()
