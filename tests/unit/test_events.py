"""Event validation and normalization: each rule at its edge, each refusal named."""

from __future__ import annotations

import os
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.events import EventLimits, InvalidEvent, _check_tree, _tree_ok, lookup, normalize_event

NOW = 1_795_600_000_000  # 2026-11-25T... in epoch ms
LIMITS = EventLimits()


def norm(raw: object, limits: EventLimits = LIMITS) -> dict[str, object]:
    result: dict[str, object] = orjson.loads(normalize_event(raw, NOW, limits))
    return result


def refused(raw: object, limits: EventLimits = LIMITS) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        normalize_event(raw, NOW, limits)
    return info.value


def test_minimal_event_gets_id_time_and_received_at() -> None:
    event = norm({"type": "click"})
    assert set(event) == {"type", "event_id", "ts", "received_at"}
    assert event["type"] == "click"
    assert event["ts"] == NOW and event["received_at"] == NOW
    assert uuid.UUID(str(event["event_id"])).version == 4


def test_full_event_is_kept_and_event_id_canonicalized() -> None:
    eid = "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"
    event = norm({
        "type": "purchase", "event_id": eid, "ts": "2026-11-25T10:00:00.250+01:00",
        "source": "web", "user_id": "u1", "session_id": "s1", "properties": {"amount": 12.5, "tags": ["a"]},
    })
    assert event == {
        "type": "purchase", "event_id": eid.lower(), "ts": 1_795_597_200_250, "received_at": NOW,
        "source": "web", "user_id": "u1", "session_id": "s1", "properties": {"amount": 12.5, "tags": ["a"]},
    }


def test_epoch_ms_and_rfc3339_z() -> None:
    assert norm({"type": "a", "ts": NOW - 5})["ts"] == NOW - 5
    assert norm({"type": "a", "ts": "2026-11-25T09:00:00Z"})["ts"] == 1_795_597_200_000


@pytest.mark.parametrize(
    ("raw", "reason", "words"),
    [
        ([], "not_object", "JSON object"),
        ({"type": "a", "colour": 1}, "unknown_field", "colour"),
        ({}, "type", "type is required"),
        ({"type": "has space"}, "type", "type is required"),
        ({"type": "x" * 65}, "type", "must match"),
        ({"type": "a", "event_id": "nope"}, "event_id", "not a UUID"),
        ({"type": "a", "event_id": 5}, "event_id", "UUID string"),
        ({"type": "a", "ts": "yesterday"}, "ts", "not an RFC 3339"),
        ({"type": "a", "ts": "2026-11-25T09:00:00"}, "ts", "no UTC offset"),
        ({"type": "a", "ts": True}, "ts", "epoch milliseconds"),
        ({"type": "a", "source": 5}, "source", "source must be a string"),
        ({"type": "a", "properties": [1]}, "properties", "JSON object"),
    ],
)
def test_each_rule_names_what_is_wrong(raw: object, reason: str, words: str) -> None:
    err = refused(raw)
    assert err.reason == reason
    assert words in str(err)


def test_type_charset_edge() -> None:
    assert norm({"type": "A-z_0.9:x" + "y" * 55})["type"] == "A-z_0.9:x" + "y" * 55
    # `$` in a pattern also matches before a final newline: "purchase\n" would be a new type
    for bad in ("purchase\n", "a\nb", "\npurchase", "x" * 65):
        assert refused({"type": bad}).reason == "type", bad


def test_time_window_edges() -> None:
    late = LIMITS.lateness_ms
    assert norm({"type": "a", "ts": NOW - late})["ts"] == NOW - late
    assert refused({"type": "a", "ts": NOW - late - 1}).reason == "ts_late"
    assert norm({"type": "a", "ts": NOW + LIMITS.future_ms})["ts"] == NOW + LIMITS.future_ms
    assert refused({"type": "a", "ts": NOW + LIMITS.future_ms + 1}).reason == "ts_future"


def test_depth_edge() -> None:
    limits = EventLimits(max_depth=3)
    ok = {"type": "a", "properties": {"a": {"b": {"c": 1}}}}  # properties=1, a=2, b=3
    assert norm(ok, limits)["properties"] == {"a": {"b": {"c": 1}}}
    err = refused({"type": "a", "properties": {"a": {"b": {"c": {"d": 1}}}}}, limits)
    assert err.reason == "depth" and "properties.a.b.c nests deeper than 3" in str(err)


def test_property_count_key_and_string_edges() -> None:
    limits = EventLimits(max_properties=2, max_key_chars=3, max_string_chars=4)
    assert norm({"type": "a", "properties": {"abc": "wxyz", "b": 1}}, limits)
    assert "3 keys; the limit is 2" in str(refused({"type": "a", "properties": {"a": 1, "b": 2, "c": 3}}, limits))
    assert "key of 4 chars" in str(refused({"type": "a", "properties": {"abcd": 1}}, limits))
    assert "properties.a is 5 chars" in str(refused({"type": "a", "properties": {"a": "vwxyz"}}, limits))
    assert "properties.l[1] is 5 chars" in str(refused({"type": "a", "properties": {"l": ["a", "vwxyz"]}}, limits))


def test_event_bytes_edge() -> None:
    size = len(normalize_event({"type": "a", "event_id": str(uuid.UUID(int=1)), "properties": {"s": ""}}, NOW, LIMITS))
    exact = {"type": "a", "event_id": str(uuid.UUID(int=1)), "properties": {"s": "x" * 100}}
    limits = EventLimits(max_event_bytes=size + 100)
    assert len(normalize_event(exact, NOW, limits)) == size + 100
    exact["properties"] = {"s": "x" * 101}
    err = refused(exact, limits)
    assert err.reason == "too_large" and f"{size + 101} bytes; the limit is {size + 100}" in str(err)


def test_huge_integers_refused() -> None:
    assert norm({"type": "a", "properties": {"n": 2**63 - 1}})
    assert "64-bit" in str(refused({"type": "a", "properties": {"n": -(2**63)}}))


def test_lookup_paths() -> None:
    event = {"type": "a", "properties": {"geo": {"country": "DE"}, "n": 0}}
    assert lookup(event, ("properties", "geo", "country")) == "DE"
    assert lookup(event, ("properties", "n")) == 0
    assert lookup(event, ("properties", "geo", "city")) is None
    assert lookup(event, ("properties", "n", "x")) is None
    assert lookup(event, ("source",)) is None


def test_assigned_event_ids_are_unique_random_uuid4s() -> None:
    now = 1_764_000_000_000
    ids = [orjson.loads(normalize_event({"type": "t"}, now, EventLimits()))["event_id"] for _ in range(2_000)]
    assert len(set(ids)) == 2_000  # across several refills of the 256-id pool
    parsed = [uuid.UUID(i) for i in ids]
    assert {(u.version, u.variant) for u in parsed} == {(4, uuid.RFC_4122)}
    assert [str(u) for u in parsed] == ids  # canonical lowercase spelling
    fixed = {14: {"4"}, 19: set("89ab")}  # the version digit, and the variant's two fixed bits
    for position in range(36):
        seen = {i[position] for i in ids}
        if ids[0][position] == "-":
            assert seen == {"-"}
        else:  # every random digit takes every value it may take: no slice repeats or lags
            assert seen == fixed.get(position, set("0123456789abcdef")), position


_leaves = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
_trees = st.recursive(
    _leaves, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=30,
)


@given(tree=st.dictionaries(st.text(max_size=10), _trees, max_size=5))
def test_fast_property_check_agrees_with_the_explaining_walk(tree: dict[str, Any]) -> None:
    """The hot path's string-free check accepts exactly what the path-naming walk accepts."""
    limits = EventLimits(max_depth=3, max_key_chars=6, max_string_chars=8)
    try:
        _check_tree(tree, 1, limits, "properties")
        explained_ok = True
    except InvalidEvent:
        explained_ok = False
    assert _tree_ok(tree, 1, limits) is explained_ok


def test_a_forked_child_draws_its_own_ids() -> None:
    """Workers are forked: a child reusing the parent's pool would hand out the parent's next ids."""
    from schemas.events import _random_ids

    _random_ids.next()  # the pool is full now, 255 ids left in it
    parents_next = list(_random_ids.ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the ids it would assign, then leave without pytest's cleanup
        os.write(write, ",".join(_random_ids.next() for _ in range(300)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_ids = pipe.read().split(",")
    os.waitpid(pid, 0)
    assert len(child_ids) == 300
    assert not set(child_ids) & set(parents_next)
