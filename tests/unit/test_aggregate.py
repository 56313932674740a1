"""Pre-aggregation arithmetic: exact examples, and merge-exactness for any split into batches."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from functools import reduce
from itertools import pairwise
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.aggregate import (
    MAX_KEY_BYTES,
    Aggregates,
    aggregate,
    bucket_of,
    compile_rollup,
    compile_rollups,
    fit,
    merge,
    stringify,
    to_decimal,
)
from schemas.rollups import parse_rollup
from tests.records import views

T0 = int(datetime(2024, 3, 1, 12, 34, 56, 789_000, tzinfo=UTC).timestamp() * 1000)

BY_TYPE = parse_rollup({
    "name": "by_type", "granularity": "minute", "dimensions": ["type", "source"],
    "measures": ["count", "sum:properties.amount", "min:properties.amount", "max:properties.amount"],
})
PAGES = parse_rollup({
    "name": "pages", "granularity": "hour", "where": {"type": ["page_view", "screen_view"]},
    "dimensions": ["properties.country"], "measures": ["count", "sum:properties.ms"],
})
DAILY = parse_rollup({"name": "daily", "granularity": "day", "dimensions": [],
                      "measures": ["count", "max:properties.n.x"]})
PLANS = compile_rollups([BY_TYPE, PAGES, DAILY])


def ev(etype: str = "click", ts: int = T0, **fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {"type": etype, "event_id": "00000000-0000-4000-8000-000000000000", "ts": ts,
                             "received_at": ts}
    event.update(fields)
    return event


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


# --- the rules, one by one ------------------------------------------------------------------------


def test_bucket_floors_event_time_to_the_granularity_in_utc() -> None:
    assert bucket_of(T0, "minute") == utc(2024, 3, 1, 12, 34)
    assert bucket_of(T0, "hour") == utc(2024, 3, 1, 12)
    assert bucket_of(T0, "day") == utc(2024, 3, 1)
    assert bucket_of(-1, "minute") == utc(1969, 12, 31, 23, 59)  # floors, not truncates toward zero
    assert bucket_of(T0, "minute").tzinfo is UTC


def test_stringify_rules() -> None:
    assert stringify("DE") == "DE"
    assert stringify("") == ""
    assert stringify(None) == ""
    assert stringify(True) == "true"
    assert stringify(False) == "false"
    assert stringify(0) == "0"
    assert stringify(12) == "12"
    assert stringify(1.5) == "1.5"
    assert stringify(1e300) == "1e+300"  # orjson's spelling
    assert stringify([1, "a", None]) == '[1,"a",null]'
    assert stringify({"b": 1, "a": [True]}) == '{"b":1,"a":[true]}'
    assert stringify("a\x00b") == "a\ufffdb"  # Postgres text cannot hold NUL


def test_to_decimal_is_exact_for_json_numbers_only() -> None:
    assert to_decimal(3) == Decimal(3)
    assert to_decimal(2**62) == Decimal(2**62)
    assert to_decimal(0.1) == Decimal("0.1")  # the JSON spelling, not the binary expansion
    assert to_decimal(1e-7) == Decimal("1e-7")
    assert to_decimal(True) is None
    assert to_decimal("3") is None
    assert to_decimal(None) is None
    assert to_decimal([1]) is None


def test_fit_cuts_long_values_at_a_character_boundary() -> None:
    assert fit("short", 100) == "short"
    assert fit("x" * 150, 100) == "x" * 100
    cut = fit("é" * 100, 101)  # 2 bytes each: 50 whole characters, never half of one
    assert cut == "é" * 50
    assert len(cut.encode()) <= 101


def test_counts_sums_min_max_per_bucket_and_dimensions() -> None:
    events = [
        ev("click", T0, source="web", properties={"amount": 10}),
        ev("click", T0 + 1_000, source="web", properties={"amount": 0.1}),
        ev("click", T0 + 2_000, source="web", properties={"amount": 0.2}),
        ev("click", T0 + 60_000, source="web", properties={"amount": -3}),  # next minute
        ev("click", T0, properties={"amount": 5}),  # no source -> ""
        ev("buy", T0, source="ios"),  # no amount: counted, measures stay None
        ev("buy", T0, source="ios", properties={"amount": "12"}),  # not a number: ignored
        ev("buy", T0, source="ios", properties={"amount": True}),  # bool is not a number
    ]
    cells = aggregate(PLANS, views(PLANS, events))["by_type"]
    minute, next_minute = utc(2024, 3, 1, 12, 34), utc(2024, 3, 1, 12, 35)
    assert cells == {
        (minute, "click", "web"): [3, Decimal("10.3"), Decimal("0.1"), Decimal("10")],
        (next_minute, "click", "web"): [1, Decimal(-3), Decimal(-3), Decimal(-3)],
        (minute, "click", ""): [1, Decimal(5), Decimal(5), Decimal(5)],
        (minute, "buy", "ios"): [3, None, None, None],
    }
    total = cells[(minute, "click", "web")][1]
    assert isinstance(total, Decimal)
    assert str(total) == "10.3"  # exact: no binary float residue


def test_where_filter_and_nested_paths() -> None:
    events = [
        ev("page_view", T0, properties={"country": "DE", "ms": 120}),
        ev("screen_view", T0 + 3_600_000, properties={"country": "DE", "ms": 1.25}),
        ev("page_view", T0, properties={"country": None}),
        ev("page_view", T0),
        ev("click", T0, properties={"country": "DE", "ms": 99}),  # filtered out
        ev("daily_only", T0, properties={"n": {"x": 7}}),
        ev("daily_only", T0, properties={"n": {"x": 9.5}}),
        ev("daily_only", T0, properties={"n": 3}),  # path goes through a non-object: missing
    ]
    out = aggregate(PLANS, views(PLANS, events))
    hour = utc(2024, 3, 1, 12)
    assert out["pages"] == {
        (hour, "DE"): [1, Decimal(120)],
        (utc(2024, 3, 1, 13), "DE"): [1, Decimal("1.25")],
        (hour, ""): [2, None],
    }
    assert out["daily"] == {(utc(2024, 3, 1),): [8, Decimal("9.5")]}


def test_where_compares_stringified_values() -> None:
    spec = parse_rollup({"name": "flags", "where": {"properties.plan": ["1", "pro"]},
                         "dimensions": ["properties.plan"]})
    plan = compile_rollup(spec)
    events = [ev(properties={"plan": 1}), ev(properties={"plan": "pro"}), ev(properties={"plan": 2}), ev()]
    cells = aggregate([plan], views([plan], events))["flags"]
    assert sorted(k[1] for k in cells) == ["1", "pro"]


def test_dimension_values_are_cut_so_a_key_fits_an_index_entry() -> None:
    plan = compile_rollup(BY_TYPE)
    cells = aggregate([plan], views([plan], [ev(source="s" * 10_000), ev(source="s" * 20_000)]))["by_type"]
    assert len(cells) == 1  # both cut to the same prefix
    (key,) = cells
    assert sum(len(part.encode()) for part in key[1:]) <= MAX_KEY_BYTES


def test_float_sums_are_exact_decimal_sums_of_the_json_numbers() -> None:
    events = [ev(properties={"amount": 0.1}) for _ in range(10)] + [ev(properties={"amount": 1e20})]
    (row,) = aggregate(PLANS, views(PLANS, events))["by_type"].values()
    assert row[1] == Decimal("100000000000000000001")  # 1e20 + 10 * 0.1, nothing rounded


def test_merge_treats_none_as_identity_and_does_not_touch_its_inputs() -> None:
    a = aggregate(PLANS, views(PLANS, [ev(source="x")]))
    amounts = [ev(source="x", properties={"amount": 4}), ev(source="x", properties={"amount": -1.5})]
    b = aggregate(PLANS, views(PLANS, amounts))
    a_before = {k: {kk: list(v) for kk, v in cells.items()} for k, cells in a.items()}
    merged = merge(PLANS, a, b)
    key = (utc(2024, 3, 1, 12, 34), "click", "x")
    assert merged["by_type"] == {key: [3, Decimal("2.5"), Decimal("-1.5"), Decimal(4)]}
    assert a == a_before
    assert merge(PLANS, a, {}) == a


# --- any split into batches gives the same result ---------------------------------------------------

numbers = st.one_of(
    st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)
countries = st.sampled_from(["DE", "FR", "", None, 1, True, [1], {"a": "b"}])


@st.composite
def events_strategy(draw: st.DrawFn) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for key, strategy in (("amount", numbers), ("ms", numbers), ("country", countries)):
        if draw(st.booleans()):
            properties[key] = draw(strategy)
    if draw(st.booleans()):
        properties["n"] = {"x": draw(numbers)}
    fields: dict[str, Any] = {"properties": properties}
    source = draw(st.sampled_from([None, "web", "ios"]))
    if source is not None:
        fields["source"] = source
    etype = draw(st.sampled_from(["click", "page_view", "screen_view"]))
    return ev(etype, T0 + draw(st.integers(min_value=-2 * 86_400_000, max_value=2 * 86_400_000)), **fields)


@settings(max_examples=150, deadline=None)
@given(events=st.lists(events_strategy(), max_size=40),
       cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=6))
def test_any_split_into_batches_merges_to_the_same_aggregates(events: list[dict[str, Any]], cuts: list[int]) -> None:
    bounds = sorted({0, len(events), *(min(c, len(events)) for c in cuts)})
    batches = [events[a:b] for a, b in pairwise(bounds)]
    partials = [aggregate(PLANS, views(PLANS, batch)) for batch in batches]
    empty: Aggregates = {p.name: {} for p in PLANS}
    merged = reduce(lambda x, y: merge(PLANS, x, y), partials, empty)
    assert merged == aggregate(PLANS, views(PLANS, events))
    # merging is also order-independent
    assert reduce(lambda x, y: merge(PLANS, x, y), reversed(partials), empty) == merged
