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
# The shipped rollup's sketch measures, as a query without `fields` returns them.
SKETCH_FIELDS = ("uniq_user_id", "p50_properties_amount", "p95_properties_amount", "p99_properties_amount")


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
    assert q.fields == ("bucket", "type", "source", *MEASURES, *SKETCH_FIELDS)
    assert q.group == ("bucket", "type", "source")
    assert q.measures == (*MEASURES, *SKETCH_FIELDS)
    assert not q.in_python  # ordered by the group key: SQL pages it
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
        ({"filter[count]": "1"}, "filter[count] item '1'"),  # a measure filter is a range
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


def test_time_zone() -> None:
    q = parse({"granularity": "day", "tz": "Europe/Paris", "from": "2026-07-14", "to": "2026-07-16"})
    assert q.zone == "Europe/Paris"
    assert q.range.start == datetime(2026, 7, 13, 22, tzinfo=UTC) and q.range.end == datetime(2026, 7, 15, 22,
                                                                                               tzinfo=UTC)
    utc = parse({"granularity": "day", "from": "2026-07-14", "to": "2026-07-16"})
    assert utc.zone == "UTC" and q.identity() != utc.identity() and q.fingerprint() != utc.fingerprint()
    assert "unknown time zone" in error({"tz": "Europe/Paris'; DROP TABLE x; --"})
    hourly = parse_rollup({"name": "h", "granularity": "hour", "dimensions": ["type"], "measures": ["count"]})
    assert "cannot be merged exactly into days of time zone 'Asia/Kolkata'" in error(
        {"granularity": "day", "tz": "Asia/Kolkata"}, hourly)
    assert parse({"granularity": "day", "tz": "Europe/Paris"}, hourly).zone == "Europe/Paris"


def test_measure_ranges() -> None:
    q = parse({"fields": "type,count", "filter[max_properties_amount]": "lt:10.5,gte:-2", "filter[type]": "buy"})
    assert q.filters == (("type", ("buy",)),)
    assert [(m, [b.spelled for b in bs]) for m, bs in q.bounds] == [("max_properties_amount", ["gte:-2", "lt:10.5"])]
    assert q.computed_measures == ("count", "max_properties_amount")  # filtered on, not returned
    assert q.identity() != parse({"fields": "type,count", "filter[type]": "buy"}).identity()
    for bad in ("10", "gte:", "gte:1e9", "gte:NaN", "between:1", "gte:1;DROP", "gte:0x10"):
        assert f"filter[count] item {bad!r} is not a bound" in error({"filter[count]": bad})
    assert "gives 'gt' more than once" in error({"filter[count]": "gt:1,gt:2"})


def test_total_flag() -> None:
    assert parse({"total": "true"}).total and not parse({"total": "false"}).total and not parse({}).total
    assert parse({"total": "true"}).identity() != parse({}).identity()
    assert "'total' must be true or false" in error({"total": "yes please"})


def test_too_many_buckets_is_refused_with_a_way_out() -> None:
    detail = error({"from": "-365d", "to": "now"})
    assert "spans about 525,601 minute buckets, more than the 100,000" in detail
    assert "coarser granularity (hour, day, week, month)" in detail and "TALLY_MAX_BUCKETS" in detail
    assert "more than the 100,000" in error({"from": "-365d", "limit": "10"})  # a limit bounds the page, not the work
    assert parse({"from": "-365d", "granularity": "hour"}).range.buckets("hour") == 8_761
    assert parse({"from": "-365d", "fields": "type,count"}).group == ("type",)  # totals group no buckets


def test_csv_exports_may_exceed_a_page() -> None:
    export = parse({"format": "csv", "limit": "250000"})
    assert export.export and export.limit == 250_000
    assert not parse({"format": "csv", "limit": "10000"}).export
    assert "'limit' must be an integer from 1 to 10000" in error({"limit": "250000"})
    assert "'limit' must be an integer from 1 to 1000000" in error({"format": "csv", "limit": "1000001"})


def test_sketch_and_average_fields() -> None:
    q = parse({"fields": "type,uniq_user_id,p999_properties_amount,avg_properties_amount",
               "order": "-p999_properties_amount", "filter[uniq_user_id]": "gte:2"})
    assert q.measures == ("uniq_user_id", "p999_properties_amount", "avg_properties_amount")
    assert q.in_python  # SQL cannot order or filter by an estimate
    assert q.computed_measures == q.measures
    assert not parse({"fields": "type,avg_properties_amount", "order": "-avg_properties_amount"}).in_python
    with pytest.raises(BadRequest) as caught:
        parse({"fields": "quantiles_properties_amount,p100_properties_amount"})
    assert str(caught.value.detail).startswith(
        "unknown field(s): 'quantiles_properties_amount', 'p100_properties_amount'; available: bucket, type, source, "
        "count, sum_properties_amount, min_properties_amount, max_properties_amount, uniq_user_id, "
        "avg_properties_amount, p<1-99|999>_properties_amount")
