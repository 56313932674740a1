"""The opt-in SQLite spool: what a close, a crash or an outage left undelivered is re-sent at the
next start with its own Idempotency-Key and bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tally_client import Client, Options
from tally_client._batching import Batch
from tally_client._spool import Spool

from tests.client.conftest import CLIENT_DIR
from tests.client.fake_ingest import fake_ingest


def test_put_load_remove(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.db")
    spool = Spool(path)
    a = Batch([b'{"type":"a","n":1}', b'{"type":"a","n":"x\\ny"}'])
    a.seal(1_795_604_400_123, 0)
    b = Batch([b'{"type":"b"}'])
    b.seal(1_795_604_400_124, 1 << 20)
    spool.put(a)
    spool.put(b)
    spool.put(a)  # again: no duplicate
    assert len(spool) == 2
    spool.close()
    again = Spool(path)
    loaded = again.load()
    assert [(x.key, x.body, x.gzipped, x.sent_at_ms, x.events) for x in loaded] == [
        (a.key, a.body, True, a.sent_at_ms, a.events),
        (b.key, b.body, False, b.sent_at_ms, b.events),
    ]
    again.remove(a.key)
    assert [x.key for x in again.load()] == [b.key]
    again.close()


def test_close_during_an_outage_keeps_the_batch_for_the_next_start(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.db")
    opts = Options(
        spool_path=path,
        backoff_base=0.05,
        backoff_max=0.05,
        flush_interval=0.05,
        shutdown_timeout=0.3,
        max_retries=1000,
    )
    dropped: list[object] = []
    with fake_ingest() as fake:
        fake.default = lambda seen: (503, {}, None)
        with Client(fake.url, options=opts, on_dropped=lambda e, r: dropped.append(r)) as tally:
            for i in range(5):
                tally.capture("a", properties={"i": i})
            time.sleep(0.2)  # the batch is out and being retried
            tally.capture("b")  # still in the queue at close
        first = tally.stats()
        assert (first.sent, first.dropped, first.spooled, first.queue_depth) == (0, 0, 6, 0)
        assert dropped == []
        down_keys = {s.key for s in fake.seen}
        down_bytes = {s.raw for s in fake.seen}
        assert len(down_keys) == 1
    with fake_ingest() as fake, Client(fake.url, options=opts) as tally:
        assert tally.flush(timeout=5)
        stats = tally.stats()
    assert (stats.captured, stats.sent, stats.spooled, stats.queue_depth) == (6, 6, 0, 0)
    assert fake.seen[0].key in down_keys and fake.seen[0].raw in down_bytes  # the same key, the same bytes
    assert sorted(e["type"] for e in fake.events()) == ["a"] * 5 + ["b"]
    spool = Spool(path)
    assert len(spool) == 0
    spool.close()


def test_a_killed_process_loses_nothing_it_sent(tmp_path: Path) -> None:
    path = str(tmp_path / "spool.db")
    with fake_ingest() as fake:
        fake.default = lambda seen: (503, {"Retry-After": "0"}, None)
        code = f"""
import sys, time
sys.path.insert(0, {str(CLIENT_DIR)!r})
from tally_client import Client, Options
c = Client({fake.url!r}, options=Options(spool_path={path!r}, flush_interval=0.05, backoff_base=0.05,
                                         backoff_max=0.05, max_retries=1000))
for i in range(30):
    c.capture("k", properties={{"i": i}})
c.flush(timeout=0.5)
print("ready", flush=True)
time.sleep(60)
"""
        proc = subprocess.Popen([sys.executable, "-I", "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()
        keys = {s.key for s in fake.seen}
    spool = Spool(path)
    assert len(spool) >= 1 and keys
    spool.close()
    with fake_ingest() as fake, Client(fake.url, options=Options(spool_path=path)) as tally:
        assert tally.flush(timeout=5)
        assert tally.sent == 30
    assert {s.key for s in fake.seen} <= keys
    assert sorted(e["properties"]["i"] for e in fake.events()) == list(range(30))
    spool = Spool(path)
    assert tally.stats().spooled == 0 and len(spool) == 0
    spool.close()
