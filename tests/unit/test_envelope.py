"""The Kafka envelope: packing respects the byte bound and round-trips exactly."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.envelope import OVERHEAD, EnvelopeError, headers, pack, unpack


def test_pack_round_trip_and_bound() -> None:
    events = [orjson.dumps({"type": "t", "i": i, "pad": "x" * (i % 50)}) for i in range(500)]
    values = list(pack(events, 4096))
    assert all(len(v) <= 4096 for v in values)
    assert len(values) > 1
    decoded = [e for v in values for e in unpack(v)]
    assert decoded == [orjson.loads(e) for e in events]
    assert orjson.loads(values[0])["v"] == 1


def test_pack_fills_records_greedily() -> None:
    event = orjson.dumps({"a": 1})  # 7 bytes; envelope overhead 19 bytes
    values = list(pack([event] * 10, 19 + 7 * 3 + 2))
    assert [len(unpack(v)) for v in values] == [3, 3, 3, 1]


def test_oversized_event_gets_its_own_record() -> None:
    big = orjson.dumps({"s": "x" * 100})
    values = list(pack([b'{"a":1}', big, b'{"a":2}'], 50))
    assert [unpack(v) for v in values] == [[{"a": 1}], [{"s": "x" * 100}], [{"a": 2}]]


def test_empty_input_packs_nothing() -> None:
    assert list(pack([], 100)) == []


@pytest.mark.parametrize(
    ("value", "words"),
    [(None, "no value"), (b"\xff", "not JSON"), (b'{"v":2,"events":[]}', "version 1"),
     (b"[1]", "version 1"), (b'{"v":1}', "no events")],
)
def test_unreadable_records_say_why(value: bytes | None, words: str) -> None:
    with pytest.raises(EnvelopeError, match=words):
        unpack(value)


def test_headers_name_schema_and_request() -> None:
    assert headers("req-1") == [("tally-schema", b"1"), ("tally-request-id", b"req-1")]


def _pack_one_step_per_event(encoded_events: list[bytes], max_bytes: int) -> list[bytes]:
    """`pack` as it was written first, a step per event: the oracle of the bisecting one."""
    out, chunk, size = [], [], OVERHEAD
    for event in encoded_events:
        added = len(event) + (1 if chunk else 0)
        if chunk and size + added > max_bytes:
            out.append(b'{"v":1,"events":[' + b",".join(chunk) + b"]}")
            chunk, size, added = [], OVERHEAD, len(event)
        chunk.append(event)
        size += added
    if chunk:
        out.append(b'{"v":1,"events":[' + b",".join(chunk) + b"]}")
    return out


@given(sizes=st.lists(st.integers(0, 60), max_size=60), max_bytes=st.integers(0, 300))
def test_pack_cuts_where_packing_event_by_event_does(sizes: list[int], max_bytes: int) -> None:
    events = [orjson.dumps("x" * n) for n in sizes]
    assert list(pack(events, max_bytes)) == _pack_one_step_per_event(events, max_bytes)
