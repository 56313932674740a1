"""Hypothesis-generated hostile event batches posted to a real `tally ingest`, checked against an
oracle written from the README's rules (not from schemas.events), then read back from Kafka.

Bodies are built as JSON *text*, so they can say what a JSON encoder never would: duplicate keys,
NaN/Infinity, lone surrogate escapes, integers beyond 64 bits, numbers that overflow a double,
nesting past any limit. The contract tested, for every request:

- a body that is not JSON (RFC 8259: no NaN/Infinity, no lone surrogates, no overflowing numbers,
  at most 1024 levels) is a 400 problem naming it, for `application/json`; in NDJSON only its
  line is refused, by index;
- duplicate keys keep the LAST value, at every level, the batch's `events` key included, and
  the event is judged on that value;
- an integer literal with |n| >= 2^63 is refused (never silently rounded to a float), floats at
  the edges (5e-324, -0.0, 1.7976931348623157e308) are kept exactly, NUL and any Unicode in
  strings are kept exactly;
- otherwise a 202 whose `rejected` lists exactly the invalid events by index, each error naming
  the field at fault, or a 422 problem listing them when none is valid; never a 5xx;
- and Kafka then holds exactly the accepted events, with exactly the values sent; a good batch
  afterwards is accepted as usual.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from core.settings import Settings
from tests.hostile.support import assert_problem
from tests.kafka_read import read_topic
from tests.processes import tally_process

pytestmark = pytest.mark.integration

EXAMPLES = 80
TYPE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # whole string: fullmatch, never `$` (it admits a final "\n")
SHORT_CHARS = 256
BIG = 2**63


@dataclass(frozen=True)
class J:
    """A piece of JSON text, what a correct parser makes of it, and what is wrong with it."""

    text: str
    value: Any = None
    broken: bool = False  # not JSON at all
    big: bool = False  # holds (after duplicate keys are resolved) an integer literal with |n| >= 2^63

    def __repr__(self) -> str:  # falsifying examples stay readable (and small)
        text = self.text if len(self.text) <= 120 else f"{self.text[:100]}...({len(self.text)} chars)"
        return f"J({text!r}{', broken' if self.broken else ''}{', big' if self.big else ''})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # what Hypothesis prints
        printer.text(repr(self))


def jstr(s: str, ascii_only: bool = False) -> J:
    return J(json.dumps(s, ensure_ascii=ascii_only), s)


def jint(n: int) -> J:
    return J(str(n), n, big=abs(n) >= BIG)


def obj(pairs: list[tuple[str, J]]) -> J:
    value: dict[str, Any] = {}
    for key, item in pairs:
        value[key] = item
    return J(
        "{" + ",".join(f"{json.dumps(k)}:{v.text}" for k, v in pairs) + "}",
        {k: v.value for k, v in value.items()},
        broken=any(v.broken for _, v in pairs),
        big=any(v.big for v in value.values()),  # only the values that survive
    )


def arr(items: list[J]) -> J:
    return J(
        "[" + ",".join(i.text for i in items) + "]",
        [i.value for i in items],
        broken=any(i.broken for i in items),
        big=any(i.big for i in items),
    )


def nested(depth: int, leaf: J) -> J:
    """`depth` levels of containers around `leaf`, alternating objects and arrays."""
    out = leaf
    for level in range(depth):
        out = obj([("n", out)]) if level % 2 else arr([out])
    return out


# -- Scalars --------------------------------------------------------------------------------------

EDGE_INTS = [0, -1, 1, 2**53 + 1, BIG - 1, -(BIG - 1), BIG, -BIG, 2**64 - 1, 2**64, -(2**64), 10**30, -(10**25)]
EDGE_FLOATS = [
    "5e-324",
    "-0.0",
    "1.7976931348623157e308",
    "-1.7976931348623157e308",
    "2.2250738585072014e-308",
    "1e20",
    "1E2",
    "0.1",
    "1e-400",
    "123456789012345678901234567890.5",
]
BROKEN = [
    "NaN",
    "Infinity",
    "-Infinity",
    '"\\ud800"',
    '"\\udfff"',
    '"a\\ud83dz"',
    "1e400",
    "-1e309",
    "+1",
    "01",
    '"\x01"',
    "[1,]",
    "tru",
    "'x'",
    "[" * 1100 + "]" * 1100,
]

texts = st.text(max_size=40) | st.sampled_from(["", "\x00", "a\x00b", "é", "😀", "\u202e", "\ufeff", "\\", '"', "𝔘"])
strings = st.builds(jstr, texts, st.booleans())
ints = st.integers().map(jint) | st.sampled_from(EDGE_INTS).map(jint)
floats = st.floats(allow_nan=False, allow_infinity=False).map(lambda f: J(orjson.dumps(f).decode(), f)) | (
    st.sampled_from(EDGE_FLOATS).map(lambda t: J(t, json.loads(t)))
)
digit_strings = st.integers(10**18, 10**40).map(lambda n: jstr(str(n)))  # 19+ digits, but a string: kept
broken = st.sampled_from(BROKEN).map(lambda t: J(t, None, broken=True))
scalars = strings | ints | floats | digit_strings | st.sampled_from([J("null"), J("true", True), J("false", False)])

keys = st.sampled_from(["a", "b", "amount", "country", "", "é", "\x00", "k" * 128, "k" * 129]) | st.text(max_size=12)


def values(leaves: st.SearchStrategy[J]) -> st.SearchStrategy[J]:
    return st.recursive(
        leaves,
        lambda inner: st.lists(st.tuples(keys, inner), max_size=5).map(obj) | st.lists(inner, max_size=4).map(arr),
        max_leaves=12,
    )


long_strings = st.sampled_from([100, 8192, 8193]).flatmap(
    lambda n: st.sampled_from(["x", "é", "😀", "\x00"]).map(lambda c: jstr(c * n))
)
deep = st.tuples(st.sampled_from([6, 7, 8, 9, 40]), scalars).map(lambda t: nested(*t))


@st.composite
def properties(draw: st.DrawFn) -> J:
    """Mostly valid; deep nesting, long strings and long keys now and then break the rules."""
    pairs = draw(st.lists(st.tuples(keys, st.one_of(values(scalars), values(scalars), long_strings, deep)), max_size=6))
    if pairs and draw(st.booleans()):  # a duplicate key: the last value is the one that counts
        pairs.append((pairs[0][0], draw(values(scalars))))
    return obj(pairs)


bad_properties = st.one_of(
    st.sampled_from([J("[]", []), jstr("x"), J("1", 1), obj([(f"p{i}", jint(i)) for i in range(101)])]),
    st.tuples(st.sampled_from([9, 40]), scalars).map(lambda t: obj([("d", nested(*t))])),
    st.sampled_from(["x", "é", "\x00"]).map(lambda c: obj([("s", jstr(c * 8193))])),
    st.just(obj([("k" * 129, jint(1))])),
)


# -- Events ---------------------------------------------------------------------------------------

WORD = {
    "broken": "not valid JSON",
    "big": "64-bit",
    "object": "must be a JSON object",
    "unknown": "unknown field",
    "type": "type",
    "ts": "ts",
    "size": "bytes",
    "properties": "properties",
}
# The fault each event gets (two in seven get none; random properties may break rules as well).
FAULTS = ["none"] * 4 + ["broken", "big", "object", "unknown", "type", "dup_type", "ts", "short", "properties", "size"]
SHORTS = ("source", "user_id", "session_id")


@dataclass
class Event:
    j: J
    expected: str | None  # the first rule the event breaks (a key of WORD, or a short field's name), or None
    kafka: dict[str, Any] = field(default_factory=dict)  # what Kafka must hold for it, when valid

    def __repr__(self) -> str:
        return f"Event({self.j!r}, expected={self.expected!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


types_ok = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True).map(jstr)
types_bad = st.sampled_from(["", "x" * 65, "not valid!", "é", "a\x00", "a b", "a\n", "purchase\n"]).map(
    jstr
) | st.sampled_from([J("null"), J("123", 123), J('["a"]', ["a"]), J("true", True)])


def timestamp(kind: str) -> J | None:
    recent = now_ms() - 3_600_000
    return {
        "absent": None,
        "null": J("null"),
        "ms": jint(recent),
        "iso": jstr(time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(recent / 1000))),
        "old": jstr("2020-01-01T00:00:00Z"),
        "future": jint(now_ms() + 3_600_000),
        "naive": jstr("2026-01-01T00:00:00"),
        "bool": J("true", True),
        "float": J("1.5", 1.5),
        "junk": jstr("yesterday"),
    }[kind]


TS_OK = ("absent", "absent", "null", "ms", "iso")
TS_BAD = ("old", "future", "naive", "bool", "float", "junk")
shorts_ok = st.one_of(texts.map(jstr), st.just(jstr("é" * SHORT_CHARS)), st.just(J("null")))
shorts_bad = st.sampled_from([jstr("é" * (SHORT_CHARS + 1)), J("1", 1), J("[]", []), J("{}", {})])


@st.composite
def events(draw: st.DrawFn, fault: str | None = None) -> Event:
    """One event with (at most) one injected fault, and the oracle's verdict on what was sent."""
    fault = fault or draw(st.sampled_from(FAULTS))
    if fault == "object":
        j = draw(st.one_of(scalars, st.lists(scalars, max_size=2).map(arr)))
        return Event(j, "big" if j.big else "object")
    event_id = str(uuid.uuid4())
    pairs = [("type", draw(types_bad if fault == "type" else types_ok)), ("event_id", jstr(event_id))]
    if fault == "dup_type":  # whichever `type` comes last counts
        pairs.append(("type", draw(types_bad)))
    ts_kind = draw(st.sampled_from(TS_BAD if fault == "ts" else TS_OK))
    ts = timestamp(ts_kind)
    if ts is not None:
        pairs.append(("ts", ts))
    bad_short = draw(st.sampled_from(SHORTS)) if fault == "short" else None
    for name in SHORTS:
        if name == bad_short:
            pairs.append((name, draw(shorts_bad)))
        elif draw(st.booleans()):
            pairs.append((name, draw(shorts_ok)))
    props: J | None = draw(st.none() | st.just(J("null")) | properties())
    if fault == "broken":
        props = obj([("x", draw(broken))])
    elif fault == "big":
        props = obj([("n", jint(draw(st.sampled_from([BIG, -BIG, 2**64 - 1, 2**64, -(2**64), 10**30]))))])
    elif fault == "properties":
        props = draw(bad_properties)
    elif fault == "size":  # valid strings, too many bytes once encoded
        props = obj([("a", jstr("😀" * 8192))]) if draw(st.booleans()) else obj([("a", jstr("\x00" * 6000))])
    if props is not None:
        pairs.append(("properties", props))
    if fault == "unknown":
        pairs.append(("timestamp", jint(now_ms())))
    draw(st.randoms()).shuffle(pairs)
    j = obj(pairs)
    kafka = {k: v for k, v in j.value.items() if v is not None and k != "ts"}  # null is absent
    return Event(j, verdict(j, ts_kind), kafka)


def verdict(j: J, ts_kind: str) -> str | None:
    """The first rule a (parsed, duplicate-resolved) event breaks, in the order the README lists them."""
    if j.broken:
        return "broken"
    if j.big:
        return "big"
    event = j.value
    if set(event) - {"type", "event_id", "ts", *SHORTS, "properties"}:
        return "unknown"
    if not (isinstance(event["type"], str) and TYPE_RE.fullmatch(event["type"])):
        return "type"
    if ts_kind in TS_BAD:
        return "ts"
    for name in SHORTS:
        value = event.get(name)
        if value is not None and not (isinstance(value, str) and len(value) <= SHORT_CHARS):
            return name
    if event.get("properties") is not None and not properties_ok(event["properties"]):
        return "properties"
    if normalized_size({k: v for k, v in event.items() if v is not None and k != "ts"}) > 32 * 1024:
        return "size"
    return None


def properties_ok(value: Any) -> bool:
    """README: a JSON object, at most 100 keys, nesting 8, keys 128 chars, strings 8192 chars, 64-bit ints."""
    if not isinstance(value, dict) or len(value) > 100:
        return False

    def ok(item: Any, depth: int) -> bool:
        if isinstance(item, dict):
            return depth <= 8 and all(len(k) <= 128 and ok(v, depth + 1) for k, v in item.items())
        if isinstance(item, list):
            return depth <= 8 and all(ok(v, depth + 1) for v in item)
        if isinstance(item, str):
            return len(item) <= 8192
        if isinstance(item, int) and not isinstance(item, bool):
            return abs(item) < BIG
        return True

    return ok(value, 1)


def normalized_size(kafka: dict[str, Any]) -> int:
    """The normalized event's size: the fields sent plus ts and received_at (13-digit epoch ms)."""
    return len(orjson.dumps({**kafka, "ts": now_ms(), "received_at": now_ms()}))


@st.composite
def batches(draw: st.DrawFn) -> tuple[str, list[Event], list[Event]]:
    form = draw(st.sampled_from(["object", "array", "ndjson", "gzip"]))
    evs = draw(st.lists(events(), max_size=8))
    decoys = draw(st.lists(events(), max_size=2)) if form in ("object", "gzip") else []
    return form, evs, decoys


# NDJSON batches holding one event of every fault (and two without), so that every rule is
# exercised whatever the random run below happens to draw.
every_fault = (
    st.tuples(*(events(f) for f in dict.fromkeys(FAULTS)), events("none"))
    .flatmap(lambda t: st.permutations(list(t)))
    .map(lambda evs: ("ndjson", evs, []))
)
# The same as one JSON array: a body that holds a non-JSON event is a 400, so the run's answers
# include one whatever the random batches below happen to draw (80 of them did not, once).
every_fault_json = every_fault.map(lambda batch: ("array", batch[1], []))


def encode(form: str, evs: list[Event], decoys: list[Event]) -> tuple[bytes, dict[str, str]]:
    items = ",".join(e.j.text for e in evs)
    if form == "ndjson":
        return "\n\n".join(e.j.text for e in evs).encode(), {"content-type": "application/x-ndjson"}
    if form == "array":
        return f"[{items}]".encode(), {"content-type": "application/json"}
    # A duplicate `events` key: only the last one is the batch; the decoys must never be written.
    first = '"events":[' + ",".join(e.j.text for e in decoys) + "]," if decoys else ""
    text = ("{" + first + '"events":[' + items + "]}").encode()
    if form == "gzip":
        return gzip.compress(text), {"content-type": "application/json", "content-encoding": "gzip"}
    return text, {"content-type": "application/json"}


@dataclass
class Ledger:
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    never: set[str] = field(default_factory=set)  # event ids that must not reach Kafka
    requests: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)  # refusals seen, by the rule broken

    def saw(self, reason: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def post_and_check(http: httpx.Client, ledger: Ledger, form: str, evs: list[Event], decoys: list[Event]) -> None:
    body, headers = encode(form, evs, decoys)
    response = http.post("/v1/events", content=body, headers=headers)
    ledger.requests += 1
    ledger.statuses[response.status_code] = ledger.statuses.get(response.status_code, 0) + 1
    status, content_type = response.status_code, response.headers.get("content-type", "")
    seen = f"{form} body {body[:400]!r} -> {status} {response.text[:400]}"
    ledger.never.update(e.kafka["event_id"] for e in decoys if e.kafka)
    whole_body_broken = form != "ndjson" and (any(e.j.broken for e in evs) or any(e.j.broken for e in decoys))
    if whole_body_broken:
        problem = assert_problem(status, content_type, response.content, expected=400)
        assert "not valid JSON" in problem["detail"], seen
        ledger.never.update(e.kafka["event_id"] for e in evs if e.kafka)
        ledger.saw("broken")
        return
    invalid = [(i, e.expected) for i, e in enumerate(evs) if e.expected is not None]
    valid = [e for e in evs if e.expected is None]
    if not valid:
        problem = assert_problem(status, content_type, response.content, expected=422)
        errors = problem.get("errors", [])
    else:
        assert status == 202, seen
        assert content_type == "application/json", seen
        result = response.json()
        assert result["accepted"] == len(valid), seen
        errors = result["rejected"]
    assert [e["index"] for e in errors] == [i for i, _ in invalid], seen
    for error, (_, why) in zip(errors, invalid, strict=True):
        assert why is not None
        assert WORD.get(why, why) in error["error"], (why, error, seen)
        ledger.saw(why if why not in SHORTS else "short")
    for e in evs:
        if e.expected is None:
            ledger.accepted[e.kafka["event_id"]] = e.kafka
        elif e.kafka:
            ledger.never.add(e.kafka["event_id"])


def fuzz(url: str, ledger: Ledger) -> None:
    """Runs in a thread: the served app answers from the test's event loop meanwhile."""
    with httpx.Client(base_url=url, timeout=30) as http:
        for strategy, examples in ((every_fault, 5), (every_fault_json, 2), (batches(), EXAMPLES)):

            @hsettings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=[Phase.generate],  # no shrinking: each step is a request; the failing batch is shown
            )
            @given(strategy)
            def run(batch: tuple[str, list[Event], list[Event]]) -> None:
                post_and_check(http, ledger, *batch)

            run()


async def test_hostile_event_payloads_get_exact_answers_and_exact_kafka_contents(
    migrated: Settings, tmp_path: Path
) -> None:
    settings = migrated
    ledger = Ledger()
    # A `tally ingest` process of its own: Hypothesis, generating here, must be the only user of
    # this process's `random` (aiokafka's partitioner draws from it).
    ingest = await asyncio.to_thread(tally_process("ingest", settings, tmp_path).start)
    try:
        url = f"http://127.0.0.1:{ingest.port}"
        await asyncio.to_thread(fuzz, url, ledger)
        good = [{"type": "after.hostile", "event_id": str(uuid.uuid4()), "properties": {"ok": True}} for _ in range(3)]
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            response = await http.post("/v1/events", json={"events": good})
        assert response.status_code == 202, response.text
        assert response.json() == {"accepted": 3, "rejected": []}
    finally:
        await asyncio.to_thread(ingest.stop)
    for e in good:
        ledger.accepted[str(e["event_id"])] = e
    assert ledger.requests >= EXAMPLES
    assert 5 not in {code // 100 for code in ledger.statuses}, ledger.statuses
    # The run covered every answer and every rule (each fault is injected into ~1 event in 18).
    assert {202, 400, 422} <= ledger.statuses.keys(), ledger.statuses
    assert set(WORD) | {"short"} <= ledger.reasons.keys(), ledger.reasons

    records = await read_topic(str(settings.kafka_bootstrap), settings.topic, expect_events=len(ledger.accepted))
    stored = {e["event_id"]: e for e, _ in records}
    assert len(stored) == len(records), "an event was written twice"
    assert not stored.keys() & ledger.never
    assert stored.keys() == ledger.accepted.keys()
    for event_id, sent in ledger.accepted.items():
        got = stored[event_id]
        assert {k: got[k] for k in sent} == sent, (sent, got)
        assert set(got) - set(sent) <= {"ts", "received_at"}
