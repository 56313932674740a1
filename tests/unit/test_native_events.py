"""The short way (msgspec structs, `schemas.native.Normalizer`) against the general way (orjson
dicts, `normalize_event` one event at a time, as ingest did before schemas.native), which is
the oracle: for any body, valid, invalid or hostile, both give the same 400/413, the same
accept/reject decision per event, the same reason, and envelopes of the same JSON value
(numbers included, -0.0 apart from 0.0) whatever bytes carry them.

Random event ids cannot match between two runs, so an event the producer gave no usable id
is compared without it (and its id checked to be a lowercase UUID4). TALLY_DIFF_EXAMPLES sets
how many bodies hypothesis tries (default 2,000; the count run is printed).
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.problems import TallyError
from ingest.body import ParsedBatch, parse_batch, parse_batch_yielding
from schemas import envelope
from schemas.events import UNPARSABLE, EventLimits, InvalidEvent, normalize_event
from schemas.native import NativeEvent, Normalizer

EXAMPLES = int(os.environ.get("TALLY_DIFF_EXAMPLES", "2000"))
NOW = 1_796_000_000_000
# Small limits, so that generated events reach every edge often.
LIMITS = EventLimits(
    max_event_bytes=700, max_depth=3, max_properties=5, max_key_chars=6, max_string_chars=12, max_short_chars=10,
    lateness_ms=3_600_000, future_ms=300_000,
)
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
EXAMPLES_RUN = [0]
# Small, so that a batch often needs several envelopes; 300 is below one event's limit (700),
# as an operator may set it, so that an envelope can be too small for a whole batch.
ENVELOPE_MAXES = (1_500, 300)

# --- bodies as JSON text, so that duplicate keys, odd numbers and hostile bytes can be spelled ---

def _number() -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(-(2**70), 2**70).map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(lambda f: orjson.dumps(f).decode()),
        st.sampled_from(["-0", "-0.0", "1e400", "-1e-400", "5e-324", "1E2", "9223372036854775807",
                         "9223372036854775808", "-9223372036854775808", "123456789012345678", "NaN", "01", "1."]),
    )


def _string(max_size: int = 16) -> st.SearchStrategy[str]:
    text = st.text(st.characters(codec="utf-8"), max_size=max_size)
    escapes = st.sampled_from(['"\\ud800"', '"\\u0000"', '"a\\nb"', '"\\ud83d\\ude00"', '"\\/"', '"\t"'])
    return st.one_of(text.map(lambda s: orjson.dumps(s).decode()), escapes)


def _obj(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"


def _value(depth: int = 0) -> st.SearchStrategy[str]:
    scalar = st.one_of(_number(), _string(), st.sampled_from(["true", "false", "null"]))
    if depth >= 4:
        return scalar
    inner = st.deferred(lambda: _value(depth + 1))
    arrays = st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]")
    objects = st.lists(st.tuples(_string(8), inner), max_size=5).map(_obj)
    return st.one_of(scalar, arrays, objects)


def _uuid_text() -> st.SearchStrategy[str]:
    u = st.uuids()
    return st.one_of(
        u.map(str), u.map(lambda x: str(x).upper()), u.map(lambda x: "{" + str(x) + "}"), u.map(lambda x: x.hex),
        st.sampled_from(["not-a-uuid", "", str(uuid.UUID(int=0))]),
    ).map(lambda s: orjson.dumps(s).decode())


def _ts() -> st.SearchStrategy[str]:
    near = st.integers(NOW - 4_000_000, NOW + 400_000)
    return st.one_of(
        near.map(str), near.map(lambda ms: str(ms // 1000)), st.integers(-(2**40), 2**45).map(str),
        st.sampled_from(["9223372036854775807", "9223372036854775808", "-9223372036854775808",
                         "1180591620717411303424"]),  # 64 bits' edges, and beyond
        st.sampled_from(['"2026-11-30T10:00:00Z"', '"2026-11-30T10:00:00"', '"yesterday"', "true", "1.5e12",
                         f'"{orjson.dumps(NOW).decode()}"', "null"]),
    )


def _usual(valid: st.SearchStrategy[str], hostile: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Mostly a valid value, often enough a hostile one."""
    return st.integers(0, 3).flatmap(lambda n: hostile if n == 0 else valid)


_KEY = st.text("abcxyzé_\"\\", min_size=1, max_size=7).map(lambda s: orjson.dumps(s).decode())
_SMALL = st.recursive(
    st.one_of(st.integers(-(2**53), 2**53).map(str), st.floats(allow_nan=False, allow_infinity=False).map(
        lambda f: orjson.dumps(f).decode()), st.text(max_size=13).map(lambda s: orjson.dumps(s).decode()),
        st.sampled_from(["true", "false", "null", "-0.0"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]"),
                            st.lists(st.tuples(_KEY, inner), max_size=3).map(_obj)),
    max_leaves=8,
)
FIELDS: dict[str, st.SearchStrategy[str]] = {
    "type": _usual(st.sampled_from(['"page_view"', '"a"', '"x:y.z-1"', '"' + "x" * 64 + '"']),
                   st.one_of(st.sampled_from(['"a\\n"', '""', '"' + "x" * 65 + '"', '"é"', "null", "7"]), _string(4))),
    "event_id": _usual(st.uuids().map(lambda u: f'"{u}"'), st.one_of(_uuid_text(), st.sampled_from(["null", "12"]))),
    "ts": _usual(st.integers(NOW - 3_500_000, NOW + 290_000).map(str), _ts()),
    "source": _usual(st.text(max_size=11).map(lambda s: orjson.dumps(s).decode()),
                     st.one_of(_string(12), st.sampled_from(["null", "3"]))),
    "user_id": _usual(st.text(max_size=11).map(lambda s: orjson.dumps(s).decode()), _string(12)),
    "session_id": _string(12),
    "properties": _usual(st.lists(st.tuples(_KEY, _SMALL), max_size=6).map(_obj),
                         st.one_of(st.lists(st.tuples(_string(8), _value(1)), max_size=7).map(_obj),
                                   st.sampled_from(["null", "[]", '"p"']))),
    "unknown": _value(3),
}


@st.composite
def events(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 30)) == 0:
        return draw(_value(2))  # not an object, or any object
    pairs = [('"type"', draw(FIELDS["type"]))] if draw(st.integers(0, 20)) else []
    for name in ("event_id", "ts", "source", "user_id", "session_id", "properties", "unknown"):
        if draw(st.integers(0, 12 if name == "unknown" else 2)) == 0:
            # An unknown field, or the one the server adds (which the short way reads, then refuses).
            key = draw(st.sampled_from(['"timestamp"', '"received_at"'])) if name == "unknown" else f'"{name}"'
            pairs.append((key, draw(FIELDS[name])))
    if pairs and draw(st.integers(0, 10)) == 0:
        pairs.append(draw(st.sampled_from(pairs)))  # a duplicate key: the last one counts
    draw(st.randoms()).shuffle(pairs)
    return _obj(pairs)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    listed = "[" + ",".join(draw(st.lists(events(), max_size=6))) + "]"
    form = draw(st.integers(0, 12))
    if form == 0:
        text = listed
    else:
        top = [('"events"', listed)]
        if draw(st.booleans()):
            top.append(('"sent_at"', draw(_usual(st.integers(NOW - 60_000, NOW + 60_000).map(str),
                                                 st.one_of(_ts(), st.sampled_from(['"later"', "false"]))))))
        if form == 1:
            top.append(('"extra"', "1"))
        text = _obj(top)
    raw = text.encode()
    mutation = draw(st.integers(0, 30))
    if mutation == 0:
        raw = b"\xef\xbb\xbf" + raw  # a BOM
    elif mutation == 1 and len(raw) > 2:
        raw = raw[:-1] + b",]" if raw.endswith(b"]") else raw  # a trailing comma
    elif mutation == 2:
        raw = raw + b" x"
    return raw


# --- the comparison ---

def _derived(index: int) -> str:
    return str(uuid.UUID(int=index + 1))  # stands for an Idempotency-Key's derived ids


def _expected_id(raw: Any, index: int, key: bool) -> str | None:
    """The id an accepted event must carry, or None where it must be a random UUID4."""
    fields = raw.as_raw() if isinstance(raw, NativeEvent) else raw
    if "event_id" not in fields:
        return _derived(index) if key else None
    value = fields["event_id"]
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return value  # the event is refused: never looked at


async def _read(body: bytes, lazy: bool) -> ParsedBatch:
    return await parse_batch_yielding(
        body, "application/json", max_events=5, native=LIMITS, lazy_above=0 if lazy else len(body)
    )


def outcome(
    body: bytes, *, native: bool, key: bool, lazy: bool = False, envelope_max: int = ENVELOPE_MAXES[0]
) -> tuple[str, Any]:
    """`native`: read as ingest reads (`parse_batch_yielding`), else the general way alone;
    `lazy`: the short way reads the body's events a slice at a time and encodes them as it
    checks them, as ingest does a big body."""
    try:
        batch = asyncio.run(_read(body, lazy)) if native else parse_batch(body, "application/json", max_events=5)
    except TallyError as exc:
        return "refused", (type(exc).__name__, str(exc))
    read = [isinstance(e, NativeEvent) for e in batch.events]
    assert (native and all(read)) or not any(read)  # a body is read one way or the other, whole
    skew = 0 if batch.sent_at_ms is None else NOW - batch.sent_at_ms
    events = enumerate(batch.events)
    expected = {i: _expected_id(raw, i, key) for i, raw in events if isinstance(raw, dict | NativeEvent)}
    if native:
        normalizer = Normalizer(batch.events, NOW, LIMITS, skew, _derived if key else None,
                                body_bytes=1 << 30 if lazy else len(body))
        for start in range(0, len(batch.events), 2):  # in slices, as ingest runs it
            normalizer.run(start, min(start + 2, len(batch.events)))
        done = normalizer.finish(envelope_max)
        values, rejected = done.values, [(i, str(exc), exc.reason) for i, exc in done.rejected]
    else:
        encoded: list[bytes] = []
        rejected = []
        for index, raw in enumerate(batch.events):
            if raw is UNPARSABLE:
                continue
            if key and isinstance(raw, dict) and "event_id" not in raw:
                raw["event_id"] = _derived(index)
            try:
                encoded.append(normalize_event(raw, NOW, LIMITS, skew))
            except InvalidEvent as exc:
                rejected.append((index, str(exc), exc.reason))
        values = list(envelope.pack(encoded, envelope_max))
    # DESIGN §3: records of bounded size; only an event bigger than the bound on its own exceeds it.
    assert all(len(v) <= envelope_max or len(envelope.unpack(v)) == 1 for v in values)
    refused = {i for i, _, _ in rejected}
    accepted_at = [i for i in sorted(expected) if i not in refused]
    events = [event for value in values for event in envelope.unpack(value)]
    assert len(events) == len(accepted_at)
    shown = []
    for index, event in zip(accepted_at, events, strict=True):
        given = expected[index]
        if given is None:
            assert UUID4.fullmatch(event.pop("event_id")), event
        else:
            assert event["event_id"] == given, (event, given)
        shown.append(orjson.dumps(event))
    return "parsed", (batch.sent_at_ms, batch.line_errors, rejected, shown, [len(v) for v in values])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies(), key=st.booleans(), lazy=st.booleans(), envelope_max=st.sampled_from(ENVELOPE_MAXES))
def test_native_and_general_agree_on_any_body(body: bytes, key: bool, lazy: bool, envelope_max: int) -> None:
    EXAMPLES_RUN[0] += 1
    native = outcome(body, native=True, key=key, lazy=lazy, envelope_max=envelope_max)
    assert native == outcome(body, native=False, key=key, envelope_max=envelope_max), body


def test_valid_bodies_take_the_short_way() -> None:
    """Not a vacuous comparison: the usual body is read by msgspec and normalized without the
    general way, and ends the same."""
    body = orjson.dumps({"events": [
        {"type": "purchase", "source": "web", "ts": NOW - 5, "properties": {"amount": 9.99, "x": [1, {"y": -0.0}]}},
        {"type": "tap", "event_id": "6f1c0e3e-1a2b-4c3d-8e4f-5a6b7c8d9e0f", "user_id": "u1"},
        {"type": "tap", "ts": "2026-11-30T01:53:19.123+01:00", "session_id": None},  # NOW - 877 ms
    ]})
    batch = asyncio.run(_read(body, lazy=False))
    assert all(isinstance(e, NativeEvent) for e in batch.events) and len(batch.events) == 3
    normalizer = Normalizer(batch.events, NOW, LIMITS)
    normalizer.run(0, 3)
    assert all(isinstance(e, NativeEvent) for e in normalizer.kept) and len(normalizer.kept) == 3
    assert outcome(body, native=True, key=False) == outcome(body, native=False, key=False)


@pytest.fixture(scope="module", autouse=True)
def _report() -> Any:
    yield
    print(f"\nnative/general differential: {EXAMPLES_RUN[0]} bodies compared")
