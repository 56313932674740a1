"""Cutting batches by count, bytes and age; the body and its gzip (pure)."""

from __future__ import annotations

import gzip
import json

from tally_client._batching import BODY_OVERHEAD, Batch, Batcher, encode_body


def ev(i: int, pad: int = 0) -> bytes:
    return json.dumps({"type": "a", "i": i, "p": "x" * pad}, separators=(",", ":")).encode()


def test_count_cut() -> None:
    b = Batcher(max_events=3, max_bytes=1 << 20, max_age=0.5)
    out = [batch for i in range(7) for batch in b.add(ev(i), now=0.0)]
    assert [len(x) for x in out] == [3, 3] and len(b) == 1
    rest = b.take()
    assert rest is not None and len(rest) == 1 and b.take() is None


def test_bytes_cut_keeps_every_body_under_the_limit() -> None:
    limit = 4096
    b = Batcher(max_events=1000, max_bytes=limit, max_age=0.5)
    batches = [x for i in range(200) for x in b.add(ev(i, pad=i % 300), now=0.0)]
    last = b.take()
    assert last is not None
    batches.append(last)
    assert sum(len(x) for x in batches) == 200
    order = [json.loads(e)["i"] for x in batches for e in x.events]
    assert order == list(range(200))  # FIFO
    for batch in batches:
        raw, _ = encode_body(batch.events, 1_795_604_400_123, gzip_min_bytes=1 << 30)
        assert len(raw) <= limit
        assert len(raw) <= BODY_OVERHEAD + sum(len(e) + 1 for e in batch.events)


def test_one_event_larger_than_the_batch_limit_goes_alone() -> None:
    b = Batcher(max_events=10, max_bytes=1024, max_age=0.5)
    assert b.add(ev(0), 0.0) == []
    out = b.add(ev(1, pad=2000), 0.0)
    assert [len(x) for x in out] == [1]  # the small one went first
    out = b.add(ev(2), 0.0)
    assert [len(x) for x in out] == [1]  # then the big one, alone
    assert len(b) == 1


def test_size_cut_and_count_cut_at_once() -> None:
    b = Batcher(max_events=1, max_bytes=1024, max_age=0.5)
    assert [len(x) for x in b.add(ev(0), 0.0)] == [1]
    assert [len(x) for x in b.add(ev(1, pad=2000), 0.0)] == [1]
    assert len(b) == 0


def test_age() -> None:
    b = Batcher(max_events=100, max_bytes=1 << 20, max_age=0.5)
    assert b.due_at() is None and b.due(10.0) is None
    b.add(ev(0), now=10.0)
    b.add(ev(1), now=10.4)
    assert b.due_at() == 10.5
    assert b.due(10.49) is None
    batch = b.due(10.5)
    assert batch is not None and len(batch) == 2 and b.due_at() is None


def test_body_small_plain_large_gzipped_deterministic() -> None:
    small = [ev(1)]
    raw, gz = encode_body(small, 1795604400123, gzip_min_bytes=1024)
    assert not gz
    assert json.loads(raw) == {"sent_at": 1795604400123, "events": [{"type": "a", "i": 1, "p": ""}]}
    big = [ev(i, pad=50) for i in range(100)]
    body, gz = encode_body(big, 1795604400123, gzip_min_bytes=1024)
    assert gz and body[:2] == b"\x1f\x8b"
    doc = json.loads(gzip.decompress(body))
    assert doc["sent_at"] == 1795604400123 and [e["i"] for e in doc["events"]] == list(range(100))
    again, _ = encode_body(big, 1795604400123, gzip_min_bytes=1024)
    assert again == body  # mtime 0: the same events give the same bytes


def test_seal_once_same_key_same_bytes() -> None:
    batch = Batch([ev(i, pad=50) for i in range(50)])
    batch.seal(1000_000_000_000, 1024)
    body, key = batch.body, batch.key
    batch.seal(2000_000_000_000, 1024)
    assert batch.body == body and batch.key == key and batch.sent_at_ms == 1000_000_000_000
    assert Batch([ev(0)]).key != key


def test_body_is_read_by_the_server_as_sent() -> None:
    """The contract with ingest: its parser takes the body and its sent_at (epoch ms)."""
    from ingest.body import parse_batch

    events = [ev(i, pad=10) for i in range(20)]
    for threshold in (0, 1 << 20):
        body, gz = encode_body(events, 1795604400123, gzip_min_bytes=threshold)
        decoded = gzip.decompress(body) if gz else body
        parsed = parse_batch(decoded, "application/json", max_events=10_000)
        assert parsed.sent_at_ms == 1795604400123 and len(parsed.events) == 20
