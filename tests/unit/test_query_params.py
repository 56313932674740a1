"""Query parameter validation: every identifier is checked against the spec, errors name it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from core.problems import BadRequest
from core.settings import DEFAULT_ROLLUPS
from query.params import Limits, OrderItem, RollupQuery, parse_query
from schemas.rollups import RollupSpec, load_rollups, parse_rollup

NOW = datetime(2026, 11, 25, 13, 37, 42, tzinfo=UTC)
LIMITS = Limits(default_limit=1_000, max_limit=10_000, max_offset=100_000)
SPEC = {s.name: s for s in load_rollups(DEFAULT_ROLLUPS)}["events_by_type"]
MEASURES = ("count", "sum_properties_amount", "min_properties_amount", "max_properties_amount")


def parse(query: dict[str, str] | list[tuple[str, str]], spec: RollupSpec = SPEC) -> RollupQuery:
    items = list(query.items()) if isinstance(query, dict) else query
    return parse_query(spec, items, LIMITS, NOW)


def error(query: dict[str, str] | list[tuple[str, str]], spec: RollupSpec = SPEC) -> str:
    with pytest.raises(BadRequest) as err:
        parse(query, spec)
    return str(err.value.detail)


def test_defaults() -> None:
    q = parse({})
    assert q.granularity == "minute"
    assert q.fields == ("bucket", "type", "source", *MEASURES)
    assert q.group == ("bucket", "type", "source")
    assert q.measures == MEASURES
    assert q.order == (OrderItem("bucket"), OrderItem("type"), OrderItem("source"))
    assert (q.limit, q.offset, q.cursor, q.format) == (1_000, 0, None, "json")
    assert q.range.start == datetime(2026, 11, 24, 13, 37, tzinfo=UTC)
    assert q.range.end == datetime(2026, 11, 25, 13, 38, tzinfo=UTC)


def test_fields_select_and_group_only_what_is_asked() -> None:
    q = parse({"fields": "source,count,bucket", "granularity": "day"})
    assert q.fields == ("source", "count", "bucket")
    assert q.group == ("bucket", "source")  # bucket first
    assert q.measures == ("count",)
    totals = parse({"fields": "count,sum_properties_amount"})
    assert totals.group == () and totals.order == ()


def test_order_is_total_with_group_tie_breakers() -> None:
    q = parse({"fields": "bucket,type,source,count,sum_properties_amount", "order": "-sum_properties_amount,type"})
    assert [o.spelled for o in q.order] == ["-sum_properties_amount", "type", "bucket", "source"]
    plus = parse({"order": " count"})  # `+count` with an unencoded plus
    assert plus.order[0] == OrderItem("count")


def test_filters_are_normalized() -> None:
    q = parse([("filter[type]", "b,a"), ("filter[type]", "a"), ("filter[source]", "")])
    assert q.filters == (("source", ("",)), ("type", ("a", "b")))


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ({"fields": "bucket,nope,count"}, "'nope'"),
        ({"fields": "count;DROP TABLE agg_events_by_type"}, "DROP TABLE"),
        ({"fields": "count,"}, "empty item"),
        ({"fields": "bucket,\"type\""}, "'\"type\"'"),
        ({"filter[country]": "de"}, "'country'"),
        ({"filter[type) OR 1=1 --]": "x"}, "OR 1=1"),
        ({"filter[count]": "1"}, "'count'"),  # measures are not filterable
        ({"order": "-nope"}, "'-nope'"),
        ({"order": "count desc"}, "'count desc'"),
        ({"order": "count", "fields": "bucket,type"}, "'count'"),  # not selected
        ({"order": "count,-count"}, "more than once"),
        ({"granularity": "second"}, "'second'"),
        ({"granularity": "hour; DROP"}, "granularity"),
        ({"bogus": "1", "extra": "2"}, "'bogus', 'extra'"),
        ({"limit": "0"}, "'limit'"),
        ({"limit": "10001"}, "'limit'"),
        ({"limit": "ten"}, "'limit'"),
        ({"offset": "100001"}, "'offset'"),
        ({"offset": "-1"}, "'offset'"),
        ({"cursor": "abc", "offset": "10"}, "'cursor' and 'offset'"),
        ({"format": "xml"}, "'xml'"),
        ({"from": "yesterday"}, "'from'"),
        ({"to": "2026-11-25T13:00:00"}, "'to'"),
        ([("limit", "1"), ("limit", "2")], "'limit'"),
    ],
)
def test_errors_name_the_culprit(query: dict[str, str] | list[tuple[str, str]], named: str) -> None:
    assert named in error(query)


def test_granularity_not_finer_than_the_table() -> None:
    hourly = parse_rollup({"name": "hourly", "granularity": "hour", "dimensions": ["type"], "measures": ["count"]})
    assert "finer" in error({"granularity": "minute"}, hourly)
    assert parse({"granularity": "week"}, hourly).granularity == "week"
    assert parse({}, hourly).granularity == "hour"


def test_fingerprint_ignores_paging_and_format_but_not_the_question() -> None:
    base = {"from": "2026-11-01T00:00:00Z", "to": "2026-11-02T00:00:00Z", "fields": "bucket,type,count"}
    fp = parse(base).fingerprint()
    assert parse({**base, "limit": "5", "format": "csv"}).fingerprint() == fp
    assert parse({**base, "from": "2026-11-01T00:00:30Z"}).fingerprint() == fp  # same aligned start
    assert parse({**base, "order": "-count"}).fingerprint() != fp
    assert parse({**base, "filter[type]": "a"}).fingerprint() != fp
    assert parse({**base, "granularity": "hour"}).fingerprint() != fp
    # Relative ranges keep their spelling: the cursor pins the range, so the clock may move.
    relative = parse_query(SPEC, [("from", "-1h")], LIMITS, NOW)
    later = parse_query(SPEC, [("from", "-1h")], LIMITS, NOW.replace(minute=59))
    assert relative.fingerprint() == later.fingerprint()
    assert relative.identity() != later.identity()  # but the cache key follows the aligned range


def test_identity_changes_with_everything_in_the_response() -> None:
    base = parse({"fields": "bucket,count"})
    for change in ({"limit": "5"}, {"offset": "5"}, {"format": "csv"}, {"fields": "count,bucket"}):
        assert parse({"fields": "bucket,count", **change}).identity() != base.identity()
