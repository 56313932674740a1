"""The consumer's fast way (msgspec views, columnar aggregation: consumers.view and
consumers.aggregate) against the way it was (orjson dicts, `check_event` and aggregation
one event at a time: tests/consumer_oracle.py), which is the oracle: for any records, valid,
invalid or hostile, `prepare` gives the same offset advances, the same dead letters byte for
byte, the same rows with equal measures, the same expired counts and the same dedup keys.

One difference is deliberate and tested on its own: an integer beyond 64 bits in a property
is read exactly (orjson read it as a rounded float). TALLY_DIFF_EXAMPLES sets how many poll
sets hypothesis tries (default 2,000).
"""

from __future__ import annotations

import os
import uuid
from decimal import Decimal
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.aggregate import compile_rollups
from consumers.batch import prepare
from schemas.rollups import parse_rollup
from tests.consumer_oracle import prepare_oracle
from tests.records import Rec

EXAMPLES = int(os.environ.get("TALLY_DIFF_EXAMPLES", "700"))
NOW = 1_796_000_000_000
HOUR = 3_600_000
SPECS = [
    parse_rollup({"name": "by_type", "dimensions": ["type", "source"], "retention": "2h",
                  "measures": ["count", "sum:properties.amount", "min:properties.amount", "max:properties.amount"]}),
    parse_rollup({"name": "pages", "where": {"type": "page_view"}, "granularity": "hour",
                  "dimensions": ["properties.country", "properties.path"], "measures": ["count"]}),
    parse_rollup({"name": "nested", "where": {"properties.flag": [True, "yes"], "type": ["a", "page_view"]},
                  "dimensions": ["properties.a.b", "user_id", "session_id"],
                  "measures": ["sum:properties.a.n", "max:properties.amount"]}),
    parse_rollup({"name": "wide", "granularity": "day", "measures": ["count", "min:properties.zz"],
                  "dimensions": ["type", "source", "user_id", "session_id", "properties.country",
                                 "properties.path", "properties.zz", "properties.a"]}),
]
PLANS = compile_rollups(SPECS)


def _obj(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{orjson.dumps(k).decode()}:{v}" for k, v in pairs) + "}"


def _j(value: Any) -> str:
    return orjson.dumps(value).decode()


_INT = st.one_of(st.integers(-1000, 1000), st.integers(-(2**63), 2**64 - 1))  # what orjson reads as int
_FLOAT = st.floats(allow_nan=False, allow_infinity=False, width=64)
_TEXT = st.one_of(st.text(max_size=6), st.sampled_from(["a\x00b", "é" * 70, "x" * 300, "true", "1", ""]))
_SCALAR = st.one_of(_INT.map(str), _FLOAT.map(_j), _TEXT.map(_j), st.sampled_from(["true", "false", "null",
                                                                                     "-0", "-0.0", "1E2", "2.50"]))
_VALUE = st.recursive(_SCALAR, lambda inner: st.one_of(
    st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
    st.lists(st.tuples(st.sampled_from(["b", "n", "q"]), inner), max_size=3).map(_obj)), max_leaves=6)
_KEYS = st.sampled_from(["amount", "country", "path", "a", "flag", "zz", "other"])


def _usual(valid: st.SearchStrategy[str], hostile: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.integers(0, 4).flatmap(lambda n: hostile if n == 0 else valid)


FIELDS: dict[str, st.SearchStrategy[str]] = {
    "type": _usual(st.sampled_from(["a", "page_view", "b.c:d-e", "x" * 64]).map(_j),
                   st.sampled_from(['"a\\n"', '""', _j("x" * 65), '"é"', "null", "7", "true"])),
    "ts": _usual(st.integers(NOW - 3 * HOUR, NOW + 60_000).map(str),
                 st.sampled_from(["1.5e12", '"2026-01-01T00:00:00Z"', "true", "null", "-62135596800001",
                                  "-62135596800000", "253402300799999", "253402300800000", "18446744073709551615"])),
    "event_id": _usual(st.uuids().map(lambda u: _j(str(u))),
                       st.one_of(st.uuids().map(lambda u: _j(str(u).upper())), st.sampled_from(
                           ['"not-a-uuid"', "null", "12", '""', _j(str(uuid.UUID(int=5)))]))),
    "source": _usual(st.sampled_from(["web", "ios", "", "s\x00", "é" * 70]).map(_j), _SCALAR),
    "user_id": _usual(st.sampled_from(["u1", "u2", "y" * 600]).map(_j), _SCALAR),
    "session_id": _usual(st.sampled_from(["s1", "s2"]).map(_j), _SCALAR),
    "properties": _usual(st.lists(st.tuples(_KEYS, _VALUE), max_size=6).map(_obj),
                         st.sampled_from(["null", "[]", '"p"', "3"])),
    "received_at": st.integers(NOW - HOUR, NOW).map(str),
}


@st.composite
def event(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 40)) == 0:
        return draw(_VALUE)  # not an object, or any object
    pairs = [(name, draw(gen)) for name, gen in FIELDS.items() if name == "type" or draw(st.integers(0, 3))]
    if pairs and draw(st.integers(0, 12)) == 0:
        pairs.append(draw(st.sampled_from(pairs)))  # a duplicate key: the last one counts
    draw(st.randoms()).shuffle(pairs)
    return _obj(pairs)


@st.composite
def record_value(draw: st.DrawFn) -> bytes | None:
    kind = draw(st.integers(0, 30))
    events = draw(st.lists(event(), max_size=8))
    if kind == 0:
        return draw(st.sampled_from([None, b"not json", b"[1]", b'{"v":2,"events":[]}', b'{"v":1}',
                                     b'{"v":1,"events":{}}', b'{"v":1,"events":["\\ud800"]}']))
    version = "1.0" if kind == 1 else "1"
    pairs = [("events", "[" + ",".join(events) + "]"), ("v", version)]
    if kind == 2:
        pairs.append(("extra", "[1,2]"))
    return _obj(pairs if kind % 2 else pairs[::-1]).encode()


@st.composite
def polls(draw: st.DrawFn) -> tuple[dict[tuple[str, int], list[Rec]], dict[tuple[str, int], int]]:
    polled: dict[tuple[str, int], list[Rec]] = {}
    expected: dict[tuple[str, int], int] = {}
    for partition in range(draw(st.integers(1, 3))):
        start = draw(st.integers(0, 3))
        first = start + draw(st.sampled_from([0, 0, 0, -1, 2]))  # a re-fetch below, or a gap above
        values = draw(st.lists(record_value(), min_size=1, max_size=5))
        polled[("events", partition)] = [Rec(max(0, first) + i, v, partition=partition) for i, v in enumerate(values)]
        if draw(st.integers(0, 8)):
            expected[("events", partition)] = start
    return polled, expected


def _same(new: Any, old: Any) -> None:
    assert new.advances == old.advances
    assert new.gaps == old.gaps
    assert new.unknown == old.unknown
    assert new.first_timestamp_ms == old.first_timestamp_ms
    assert (new.records, new.events) == (old.records, old.events)
    assert new.dead == old.dead
    assert new.expired == old.expired
    assert new.aggregates.keys() == old.aggregates.keys()
    for name, cells in old.aggregates.items():
        assert new.aggregates[name] == cells, name  # Decimal equality: 2.50 == 2.5
    assert (new.candidates.keys, new.candidates.distinct, new.candidates.repeats) == (
        old.candidates.keys, old.candidates.distinct, old.candidates.repeats)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.data_too_large])
@given(polls())
def test_prepare_matches_the_oracle_on_any_records(poll: tuple[dict[Any, list[Rec]], dict[Any, int]]) -> None:
    polled, expected = poll
    new = prepare(polled, expected, PLANS, dedup=True, now_ms=NOW)
    old = prepare_oracle(polled, expected, PLANS, dedup=True, now_ms=NOW)
    _same(new, old)


def test_a_usual_batch_is_the_same_in_both_ways() -> None:
    """Not left to chance: ordinary events, every rollup hit, floats, ints and a retention skip."""
    events = [
        {"type": "page_view", "ts": NOW - 10, "source": "web", "user_id": "u1", "event_id": str(uuid.UUID(int=i)),
         "properties": {"country": "fr", "path": "/", "amount": [1.5, 2, 0.1, 10**18][i % 4], "flag": True,
                        "a": {"b": "deep", "n": i}, "zz": i % 3}}
        for i in range(40)
    ] + [{"type": "a", "ts": NOW - 5 * HOUR, "source": "old"}]
    value = ('{"v":1,"events":[' + ",".join(_j(e) for e in events) + "]}").encode()
    polled = {("events", 0): [Rec(0, value)]}
    new = prepare(polled, {("events", 0): 0}, PLANS, dedup=True, now_ms=NOW)
    old = prepare_oracle(polled, {("events", 0): 0}, PLANS, dedup=True, now_ms=NOW)
    _same(new, old)
    assert new.expired == {"by_type": 1}
    ((_, page_view, web), row), = new.aggregates["by_type"].items()
    assert (page_view, web) == ("page_view", "web")
    assert row == [40, Decimal("10000000000000000036"), Decimal("0.1"), Decimal(10**18)]
    assert sum(c[0] for c in new.aggregates["pages"].values()) == 40


def test_integers_beyond_64_bits_are_read_exactly() -> None:
    """The one deliberate difference: orjson read 2**70 as 1.1805916207174113e+21."""
    value = b'{"v":1,"events":[{"type":"a","ts":%d,"properties":{"zz":1180591620717411303424,"a":[2e0,' \
            b'1180591620717411303424]}}]}' % NOW
    batch = prepare({("events", 0): [Rec(0, value)]}, {("events", 0): 0}, PLANS, now_ms=NOW)
    (key, row), = batch.aggregates["wide"].items()
    assert key[7:] == ("1180591620717411303424", "[2.0,1180591620717411303424]")
    assert row == [1, Decimal(2**70)]
