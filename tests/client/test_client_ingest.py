"""The client against the real ingest app (uvicorn, real Kafka-protocol broker and Redis, as the
other integration tests run it): what capture() took is in Kafka exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from tally_client import AsyncClient, Client, Options

from core import devstack
from core.settings import Settings
from ingest.app import create_app
from tests.client.conftest import CLIENT_DIR
from tests.conftest import serve
from tests.kafka_read import read_topic

pytestmark = pytest.mark.integration

OPTS = Options(flush_interval=0.05, backoff_base=0.05, backoff_max=0.5, max_retry_seconds=60)


class Proxy:
    """A TCP proxy to ingest that can lose answers: for the first `cut` requests it lets the
    request through and, as soon as ingest starts answering (a 202 is sent only after Kafka
    acknowledged the write), closes the producer's connection instead of relaying the answer."""

    def __init__(self, upstream: str, cut: int) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.cut = cut
        self.cut_done = 0
        self.requests: list[bytes] = []
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def upstream_to_client() -> None:
            while data := await up_reader.read(65536):
                if self.cut_done < self.cut:
                    self.cut_done += 1
                    writer.transport.abort()  # the answer is lost on the way back
                    up_writer.close()
                    return
                writer.write(data)
                await writer.drain()
            writer.close()

        relay = asyncio.create_task(upstream_to_client())
        try:
            while data := await reader.read(65536):
                self.requests.append(data)
                up_writer.write(data)
                await up_writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await relay

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Proxy]:
        port = devstack.free_port()
        server = await asyncio.start_server(self.handle, "127.0.0.1", port)
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2)


def idem_keys(requests: list[bytes]) -> list[str]:
    keys = []
    for chunk in requests:
        for line in chunk.split(b"\r\n"):
            if line.lower().startswith(b"idempotency-key:"):
                keys.append(line.split(b":", 1)[1].strip().decode())
    return keys


async def test_many_threads_every_event_once(migrated: Settings) -> None:
    threads, per_thread = 8, 500
    async with serve(create_app(migrated)) as url:
        tally = Client(url, options=OPTS)

        def work(t: int) -> None:
            for i in range(per_thread):
                tally.capture("purchase", source=f"t{t}", user_id=f"u{i % 7}", properties={"t": t, "i": i})

        started = time.monotonic()
        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            await asyncio.to_thread(w.join)
        assert await asyncio.to_thread(tally.flush, 30)
        elapsed = time.monotonic() - started
        await asyncio.to_thread(tally.close)
        stats = tally.stats()
    total = threads * per_thread
    assert (stats.captured, stats.sent, stats.rejected, stats.dropped, stats.queue_depth) == (total, total, 0, 0, 0)
    events = await read_topic(migrated.kafka_bootstrap or "", migrated.topic, expect_events=total, timeout_ms=30_000)
    seen = Counter((e["properties"]["t"], e["properties"]["i"]) for e, _ in events)
    assert len(events) == total and set(seen.values()) == {1} and len(seen) == total
    assert len({e["event_id"] for e, _ in events}) == total
    print(f"{total} events from {threads} threads delivered in {elapsed:.2f} s, {stats.retried} retries")


async def test_a_lost_answer_is_retried_with_the_same_key_and_counted_once(migrated: Settings) -> None:
    async with serve(create_app(migrated)) as url, Proxy(url, cut=2).running() as proxy:
        with Client(proxy.url, options=OPTS) as tally:
            for i in range(20):
                tally.capture("a", properties={"i": i})
            assert await asyncio.to_thread(tally.flush, 30)
            stats = tally.stats()
        keys = idem_keys(proxy.requests)
    assert proxy.cut_done == 2
    assert len(keys) == 3 and len(set(keys)) == 1  # one batch, three attempts, one key
    assert (stats.sent, stats.retried, stats.dropped) == (20, 2, 0)
    events = await read_topic(migrated.kafka_bootstrap or "", migrated.topic, expect_events=20)
    assert sorted(e["properties"]["i"] for e, _ in events) == list(range(20))  # written once, not thrice


async def test_refusals_are_not_retried_and_reach_the_callbacks(migrated: Settings) -> None:
    rejected: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []
    dropped: list[tuple[list[dict[str, Any]], str]] = []
    old = int(time.time() * 1000) - 30 * 86_400_000  # outside the lateness window: the server refuses it
    opts = Options(flush_interval=60, backoff_base=0.05)
    async with serve(create_app(migrated)) as url:
        with Client(
            url,
            options=opts,
            on_rejected=lambda e, r: rejected.append((e, r)),
            on_dropped=lambda e, r: dropped.append((e, r)),
        ) as tally:
            tally.capture("ok", properties={"n": 1})
            tally.capture("late", ts=old)
            assert await asyncio.to_thread(tally.flush, 10)  # 202, one rejected
            tally.capture("late", ts=old)
            assert await asyncio.to_thread(tally.flush, 10)  # 422, no valid event
            stats = tally.stats()
    authed = migrated.model_copy(update={"auth": True})
    async with serve(create_app(authed)) as url:
        with Client(
            url, api_key="tally_nope_nope", options=opts, on_dropped=lambda e, r: dropped.append((e, r))
        ) as tally:
            tally.capture("a")
            assert await asyncio.to_thread(tally.flush, 10)
            auth_stats = tally.stats()
    assert (stats.sent, stats.rejected, stats.dropped, stats.retried) == (1, 2, 0, 0)
    (events1, errors1), (events2, errors2) = rejected
    assert [e["type"] for e in events1] == ["ok", "late"] and [r["index"] for r in errors1] == [1]
    assert "lateness window" in errors1[0]["error"]
    assert events2[0]["type"] == "late" and "lateness window" in errors2[0]["error"]
    assert (auth_stats.dropped, auth_stats.retried, auth_stats.sent) == (1, 0, 0)
    [(lost, reason)] = dropped
    assert lost[0]["type"] == "a" and reason.startswith("HTTP 401")
    events = await read_topic(migrated.kafka_bootstrap or "", migrated.topic, expect_events=1)
    assert [e["type"] for e, _ in events] == ["ok"]


async def test_async_client_with_a_lost_answer(migrated: Settings) -> None:
    async with (
        serve(create_app(migrated)) as url,
        Proxy(url, cut=1).running() as proxy,
        AsyncClient(proxy.url, options=OPTS) as tally,
    ):
        for i in range(300):
            tally.capture("a", properties={"i": i})
        assert await tally.flush(timeout=30)
        stats = tally.stats()
    assert (stats.sent, stats.retried, stats.dropped) == (300, 1, 0)
    keys = idem_keys(proxy.requests)
    assert len(keys) == 4 and len(set(keys)) == 3
    events = await read_topic(migrated.kafka_bootstrap or "", migrated.topic, expect_events=300)
    assert sorted(e["properties"]["i"] for e, _ in events) == list(range(300))


async def test_spool_a_killed_producer_is_resent_with_its_key_and_counted_once(
    migrated: Settings, tmp_path: Path
) -> None:
    """The producer's batch reached Kafka but every answer was lost; the producer is killed (SIGKILL)
    while retrying. A new client on its spool re-sends the batch with the same key: counted once."""
    path = str(tmp_path / "spool.db")
    code = f"""
import sys, time
sys.path.insert(0, {str(CLIENT_DIR)!r})
from tally_client import Client, Options
c = Client(sys.argv[1], options=Options(spool_path={path!r}, flush_interval=0.05, backoff_base=0.05,
                                        backoff_max=0.1, max_retries=1_000_000))
for i in range(50):
    c.capture("spooled", properties={{"i": i}})
c.flush(timeout=1.0)
print("ready", flush=True)
time.sleep(60)
"""
    async with serve(create_app(migrated)) as url, Proxy(url, cut=1_000_000).running() as proxy:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-c", code, proxy.url, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"ready"
        finally:
            proc.kill()
            await proc.wait()
        lost = proxy.cut_done
        first_keys = set(idem_keys(proxy.requests))
        with Client(url, options=Options(spool_path=path)) as tally:
            assert await asyncio.to_thread(tally.flush, 30)
            stats = tally.stats()
    assert lost >= 2 and len(first_keys) == 1  # written at least once, every answer lost
    assert (stats.captured, stats.sent, stats.dropped, stats.spooled) == (50, 50, 0, 0)
    events = await read_topic(migrated.kafka_bootstrap or "", migrated.topic, expect_events=50)
    assert sorted(e["properties"]["i"] for e, _ in events) == list(range(50))
