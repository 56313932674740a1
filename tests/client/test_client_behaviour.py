"""Client and AsyncClient against a scripted fake ingest: batching, keys, retries, callbacks,
the bounded queue, counters. Fast (a local stdlib server, no Kafka/Redis)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
from tally_client import AsyncClient, Client, ClientClosed, Options, QueueFull

from tests.client.fake_ingest import CUT, Answer, fake_ingest

FAST = Options(backoff_base=0.01, backoff_max=0.05, flush_interval=0.05, shutdown_timeout=5.0)


class Calls:
    def __init__(self) -> None:
        self.rejected: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []
        self.dropped: list[tuple[list[dict[str, Any]], str]] = []

    def on_rejected(self, events: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> None:
        self.rejected.append((events, rejected))

    def on_dropped(self, events: list[dict[str, Any]], reason: str) -> None:
        self.dropped.append((events, reason))


def test_batches_by_count_with_sent_at_key_and_gzip() -> None:
    with fake_ingest() as fake, Client(fake.url, options=FAST) as tally:
        for i in range(250):
            tally.capture("a", properties={"i": i})
        assert tally.flush(timeout=5)
        stats = tally.stats()
    assert [len(s.doc["events"]) for s in fake.seen] == [100, 100, 50]
    assert [e["properties"]["i"] for e in fake.events()] == list(range(250))
    assert len({s.key for s in fake.seen}) == 3
    for s in fake.seen:
        assert isinstance(s.doc["sent_at"], int)
        assert s.headers["content-encoding"] == "gzip" and s.headers["content-type"] == "application/json"
        assert "authorization" not in s.headers
    assert (stats.captured, stats.sent, stats.retried, stats.rejected, stats.dropped, stats.queue_depth) == (
        250,
        250,
        0,
        0,
        0,
        0,
    )


def test_age_sends_a_small_batch_and_small_bodies_are_plain() -> None:
    with fake_ingest() as fake, Client(fake.url, api_key="tally_k_s", options=FAST) as tally:
        tally.capture("a")
        deadline = time.monotonic() + 3
        while not fake.seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake.seen, "the age limit sent the batch without a flush"
        assert "content-encoding" not in fake.seen[0].headers
        assert fake.seen[0].headers["authorization"] == "Bearer tally_k_s"
        while tally.sent != 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tally.stats().sent == 1


@pytest.mark.parametrize(
    "failure",
    [CUT, (503, {"Retry-After": "0"}, None), (429, {}, None), (409, {}, None), (408, {}, None), (500, {}, None)],
)
def test_retries_keep_the_key_and_the_bytes(failure: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tally_client")
    with fake_ingest([failure, failure]) as fake, Client(fake.url, options=FAST) as tally:
        for i in range(5):
            tally.capture("a", properties={"i": i})
        assert tally.flush(timeout=5)
        stats = tally.stats()
    assert len(fake.seen) == 3
    assert len({s.key for s in fake.seen}) == 1 and len({s.raw for s in fake.seen}) == 1
    assert (stats.sent, stats.retried, stats.dropped) == (5, 2, 0)
    decisions = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(decisions) == 2 and all(fake.seen[0].key in m for m in decisions)


def test_retry_after_is_honoured() -> None:
    with fake_ingest([(503, {"Retry-After": "1"}, None)]) as fake, Client(fake.url, options=FAST) as tally:
        tally.capture("a")
        started = time.monotonic()
        assert tally.flush(timeout=5)
        waited = time.monotonic() - started
    assert len(fake.seen) == 2 and waited >= 1.0


@pytest.mark.parametrize("status", [400, 401, 403, 413, 415])
def test_not_retried_reaches_on_dropped(status: int, caplog: pytest.LogCaptureFixture) -> None:
    calls = Calls()
    problem = {"type": "about:blank", "status": status, "detail": "nope, because"}
    with (
        fake_ingest([(status, {}, problem)]) as fake,
        Client(fake.url, options=FAST, on_dropped=calls.on_dropped, on_rejected=calls.on_rejected) as tally,
    ):
        tally.capture("a", user_id="u")
        tally.capture("b")
        assert tally.flush(timeout=5)
        stats = tally.stats()
    assert len(fake.seen) == 1
    assert (stats.sent, stats.dropped, stats.retried) == (0, 2, 0)
    [(events, reason)] = calls.dropped
    assert [e["type"] for e in events] == ["a", "b"] and events[0]["user_id"] == "u"
    assert reason == f"HTTP {status}: nope, because"
    assert any(r.levelno == logging.ERROR and "dropped batch" in r.getMessage() for r in caplog.records)


def test_partial_acceptance_and_422_reach_on_rejected(caplog: pytest.LogCaptureFixture) -> None:
    calls = Calls()
    script: list[Answer] = [
        (202, {}, {"accepted": 2, "rejected": [{"index": 1, "error": "ts too old"}]}),
        (
            422,
            {},
            {"status": 422, "detail": "no event in the batch is valid", "errors": [{"index": 0, "error": "bad"}]},
        ),
        (422, {}, {"status": 422, "detail": "the Idempotency-Key was used with a different request body"}),
    ]
    opts = Options(max_batch_events=3, flush_interval=0.05, backoff_base=0.01, backoff_max=0.02)
    with (
        fake_ingest(script) as fake,
        Client(fake.url, options=opts, on_rejected=calls.on_rejected, on_dropped=calls.on_dropped) as tally,
    ):
        for i in range(3):
            tally.capture("a", properties={"i": i})
        assert tally.flush(timeout=5)
        tally.capture("b")
        assert tally.flush(timeout=5)
        tally.capture("c")
        assert tally.flush(timeout=5)
        stats = tally.stats()
    assert len(fake.seen) == 3
    assert (stats.sent, stats.rejected, stats.dropped) == (2, 2, 1)
    (events, rejected), (events2, rejected2) = calls.rejected
    assert len(events) == 3 and rejected == [{"index": 1, "error": "ts too old"}]
    assert events2[0]["type"] == "b" and rejected2 == [{"index": 0, "error": "bad"}]
    [(dropped, reason)] = calls.dropped
    assert dropped[0]["type"] == "c" and "different request body" in reason
    assert any(r.levelno == logging.WARNING and "rejected 1 of 3" in r.getMessage() for r in caplog.records)


def test_retries_exhausted_are_dropped_loudly() -> None:
    calls = Calls()
    opts = Options(max_retries=2, backoff_base=0.01, backoff_max=0.02, flush_interval=0.05)
    with (
        fake_ingest([(503, {}, None)] * 10) as fake,
        Client(fake.url, options=opts, on_dropped=calls.on_dropped) as tally,
    ):
        tally.capture("a")
        assert tally.flush(timeout=5)
        assert (tally.retried, tally.dropped, tally.sent) == (2, 1, 0)
    assert len(fake.seen) == 3
    [(_, reason)] = calls.dropped
    assert "HTTP 503" in reason and "gave up after 2 retries" in reason


def test_network_errors_are_retried_until_the_server_is_back() -> None:
    with fake_ingest([CUT, CUT, CUT]) as fake, Client(fake.url, options=FAST) as tally:
        for _ in range(10):
            tally.capture("a")
        assert tally.flush(timeout=5)
        assert (tally.sent, tally.retried) == (10, 3)


def test_queue_full_drop_policy_counts_and_calls_back() -> None:
    calls = Calls()
    gate = threading.Event()
    opts = Options(max_queue_events=5, full_policy="drop", flush_interval=0.05, shutdown_timeout=5)
    with fake_ingest() as fake:
        default = fake.default

        def slow(seen: Any) -> Any:
            gate.wait(5)
            return default(seen)

        fake.default = slow
        with Client(fake.url, options=opts, on_dropped=calls.on_dropped) as tally:
            for i in range(8):
                tally.capture("a", properties={"i": i})
            assert tally.queue_depth == 5 and tally.dropped == 3
            gate.set()
            assert tally.flush(timeout=5)
            stats = tally.stats()
    assert (stats.captured, stats.sent, stats.dropped, stats.queue_depth) == (8, 5, 3, 0)
    assert [e[0]["properties"]["i"] for e, _ in calls.dropped] == [5, 6, 7]
    assert all(reason.startswith("queue full") for _, reason in calls.dropped)


def test_queue_full_block_policy_waits_then_raises() -> None:
    gate = threading.Event()
    opts = Options(max_queue_events=3, full_policy="block", block_timeout=0.2, flush_interval=0.05)
    with fake_ingest() as fake:
        default = fake.default

        def slow(seen: Any) -> Any:
            gate.wait(5)
            return default(seen)

        fake.default = slow
        with Client(fake.url, options=opts) as tally:
            for _ in range(3):
                tally.capture("a")
            started = time.monotonic()
            with pytest.raises(QueueFull):
                tally.capture("a")
            assert time.monotonic() - started >= 0.2
            threading.Timer(0.1, gate.set).start()
            tally.capture("a")  # room comes within block_timeout... once the batch is through
            assert tally.flush(timeout=5)
            assert (tally.sent, tally.dropped) == (4, 0)


def test_close_drops_what_it_cannot_deliver_and_refuses_new_events() -> None:
    calls = Calls()
    opts = Options(backoff_base=0.05, backoff_max=0.05, flush_interval=0.05, shutdown_timeout=0.3)
    with fake_ingest() as fake:
        fake.default = lambda seen: (503, {}, None)
        tally = Client(fake.url, options=opts, on_dropped=calls.on_dropped)
        for _ in range(3):
            tally.capture("a")
        started = time.monotonic()
        tally.close()
        assert time.monotonic() - started < 3
        assert (tally.sent, tally.dropped, tally.queue_depth) == (0, 3, 0)
        assert sum(len(e) for e, _ in calls.dropped) == 3
        assert "closed" in calls.dropped[0][1]
        with pytest.raises(ClientClosed):
            tally.capture("a")
        tally.close()  # idempotent


def test_capture_from_many_threads() -> None:
    with fake_ingest() as fake, Client(fake.url, options=FAST) as tally:

        def work(t: int) -> None:
            for i in range(500):
                tally.capture("a", properties={"t": t, "i": i})

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert tally.flush(timeout=10)
        assert tally.sent == 4000
    got = sorted((e["properties"]["t"], e["properties"]["i"]) for e in fake.events())
    assert got == [(t, i) for t in range(8) for i in range(500)]
    assert len({e["event_id"] for e in fake.events()}) == 4000


def test_a_callback_may_capture_without_deadlock() -> None:
    with fake_ingest([(400, {}, {"detail": "x"})]) as fake:
        holder: list[Client] = []

        def on_dropped(events: list[dict[str, Any]], reason: str) -> None:
            holder[0].capture("dropped_report", properties={"n": len(events)})

        with Client(fake.url, options=FAST, on_dropped=on_dropped) as tally:
            holder.append(tally)
            tally.capture("a")
            assert tally.flush(timeout=5)
            assert tally.flush(timeout=5)
            assert tally.sent == 1 and tally.dropped == 1
    assert fake.events()[-1]["type"] == "dropped_report"


def test_exit_hook_flushes_an_unclosed_client() -> None:
    import subprocess
    import sys

    from tests.client.conftest import CLIENT_DIR

    with fake_ingest() as fake:
        code = (
            f"import sys; sys.path.insert(0, {str(CLIENT_DIR)!r}); from tally_client import Client; "
            f"c = Client({fake.url!r}); [c.capture('exit', properties={{'i': i}}) for i in range(7)]"
        )
        subprocess.run([sys.executable, "-I", "-c", code], check=True, timeout=30)
    assert sorted(e["properties"]["i"] for e in fake.events()) == list(range(7))


async def test_async_client_same_shape() -> None:
    calls = Calls()
    with fake_ingest([CUT, (503, {"Retry-After": "0"}, None)]) as fake:
        async with AsyncClient(fake.url, options=FAST, on_dropped=calls.on_dropped) as tally:
            for i in range(150):
                tally.capture("a", properties={"i": i})
            assert await tally.flush(timeout=5)
            stats = tally.stats()
    assert (stats.sent, stats.retried, stats.dropped, stats.queue_depth) == (150, 2, 0, 0)
    keys = [s.key for s in fake.seen]
    assert keys[0] == keys[1] == keys[2]  # the cut and the 503 were retried with the same key
    delivered = {s.key: s for s in fake.seen}
    assert sorted(e["properties"]["i"] for s in delivered.values() for e in s.doc["events"]) == list(range(150))


async def test_async_block_policy_never_waits() -> None:
    opts = Options(max_queue_events=2, full_policy="block", block_timeout=5, flush_interval=10)
    with fake_ingest() as fake:
        tally = AsyncClient(fake.url, options=opts)
        tally.capture("a")
        tally.capture("a")
        started = time.monotonic()
        with pytest.raises(QueueFull):
            tally.capture("a")
        assert time.monotonic() - started < 0.1
        await tally.aclose()
        assert tally.sent == 2


def test_base_url_prefix_and_bad_urls() -> None:
    with fake_ingest() as fake, Client(fake.url + "/tally/", options=FAST) as tally:
        tally.capture("a")
        assert tally.flush(timeout=5) and tally.sent == 1
    assert fake.seen[0].headers[":path"] == "/tally/v1/events"
    with pytest.raises(ValueError):
        Client("ftp://example.com")
    with pytest.raises(ValueError):
        Client("localhost:8000")
