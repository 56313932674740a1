"""Which stored table answers a query: the coarsest whose buckets merge exactly into the asked
ones in the query's zone and tile its range (issue 18, item 2). Pure: specs, parsed queries, SQL text."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from sqlalchemy.dialects import postgresql

from query.catalog import Catalog, Rollup
from query.params import Limits, RollupQuery, parse_query
from query.planner import count_plan, plan, stored_granularity
from query.render import meta
from schemas.rollups import parse_rollups

NOW = datetime(2026, 11, 25, 13, 37, 42, tzinfo=UTC)
LIMITS = Limits(1_000, 10_000, 100_000, max_buckets=1_000_000)
DECLARED = {
    "rollup": [
        {
            "name": "events_by_type",
            "granularities": ["minute", "hour", "day"],
            "dimensions": ["type", "source"],
            "measures": ["count", "sum:properties.amount", "min:properties.amount", "max:properties.amount"],
        },
        {"name": "hours_only", "granularities": ["hour", "day"], "dimensions": ["type"], "measures": ["count"]},
        {"name": "base_only", "dimensions": ["type"], "measures": ["count"]},
    ]
}
CATALOG = Catalog(parse_rollups(DECLARED))
COARSE = CATALOG.get("events_by_type")
# Winter to summer: crosses Europe's and New York's spring-forward days; whole UTC days at both ends.
SPRING = {"from": "2026-01-01T00:00:00Z", "to": "2026-05-01T00:00:00Z"}


def query(rollup: Rollup, **params: str) -> RollupQuery:
    return parse_query(rollup.spec, list(params.items()), LIMITS, NOW)


def chosen(granularity: str, tz: str = "UTC", rollup: Rollup = COARSE, **params: str) -> str:
    return stored_granularity(rollup.spec, query(rollup, **{**SPRING, "granularity": granularity, "tz": tz, **params}))


@pytest.mark.parametrize(
    ("granularity", "tz", "table"),
    [
        ("minute", "UTC", "minute"),
        ("minute", "Asia/Kolkata", "minute"),
        # Hours are UTC instants in every zone (query.timerange): the hour table serves them all.
        ("hour", "UTC", "hour"),
        ("hour", "Europe/Paris", "hour"),
        ("hour", "Asia/Kolkata", "hour"),
        ("day", "UTC", "day"),
        # Paris's midnight is 23:00 or 22:00 UTC: whole hours, never a UTC day.
        ("day", "Europe/Paris", "hour"),
        ("day", "America/New_York", "hour"),
        # +05:30 and +05:45: only minutes fall on their midnights.
        ("day", "Asia/Kolkata", "minute"),
        ("day", "Asia/Kathmandu", "minute"),
        ("week", "UTC", "day"),
        ("week", "Europe/Paris", "hour"),
        ("week", "Asia/Kolkata", "minute"),
        ("month", "UTC", "day"),
        ("month", "Europe/Paris", "hour"),
        ("month", "Asia/Kolkata", "minute"),
    ],
)
def test_the_coarsest_table_that_nests_in_the_asked_buckets(granularity: str, tz: str, table: str) -> None:
    assert chosen(granularity, tz) == table


def test_a_zone_at_utc_for_the_whole_range_may_read_the_day_table() -> None:
    """London is UTC+0 in winter: its January days are UTC days; a range into summer is not."""
    winter = {"from": "2026-01-05T00:00:00Z", "to": "2026-02-02T00:00:00Z"}
    assert chosen("day", "Europe/London", **winter) == "day"
    assert chosen("week", "Europe/London", **winter) == "day"
    assert chosen("day", "Europe/London") == "hour"


def test_without_a_bucket_the_range_alone_decides() -> None:
    """Totals: the granularity only aligns the range, so any table whose buckets tile it serves."""
    totals = "type,count"
    assert chosen("minute", fields=totals) == "day"  # whole UTC days
    assert chosen("minute", fields=totals, **{"from": "2026-01-01T05:00:00Z"}) == "hour"
    assert chosen("minute", fields=totals, **{"from": "2026-01-01T05:01:00Z"}) == "minute"
    assert chosen("minute", fields=totals, **{"to": "2026-04-30T23:59:00Z"}) == "minute"
    assert chosen("day", "Asia/Kolkata", fields=totals) == "minute"  # its midnights are on no hour
    assert chosen("day", "Europe/Paris", fields=totals) == "hour"


def test_only_stored_granularities_are_read() -> None:
    base_only = CATALOG.get("base_only")
    assert base_only.spec.granularities == ("minute",)
    assert {chosen(g, rollup=base_only) for g in ("minute", "hour", "day", "week", "month")} == {"minute"}
    hours = CATALOG.get("hours_only")
    assert chosen("hour", rollup=hours) == "hour"
    assert chosen("day", rollup=hours) == "day"
    assert chosen("day", "Europe/Paris", rollup=hours) == "hour"
    assert set(hours.tables) == {"hour", "day"} and hours.table is hours.tables["hour"]


def _sql(rollup: Rollup, q: RollupQuery, total: bool = False) -> str:
    source = rollup.source(q)
    stmt = (
        count_plan(rollup.spec, source.table, q, stored=source.granularity)
        if total
        else plan(rollup.spec, source.table, q, stored=source.granularity)
    )
    return re.sub(r"\s+", " ", str(stmt.compile(dialect=postgresql.dialect())))


def test_the_plan_reads_the_chosen_table_without_date_trunc_when_sizes_match() -> None:
    hourly = _sql(COARSE, query(COARSE, **SPRING, granularity="hour", fields="bucket,type,count"))
    hour = "agg_events_by_type__hour"
    assert f"FROM {hour} WHERE {hour}.bucket >= " in hourly and "date_trunc" not in hourly
    assert f"GROUP BY {hour}.bucket, {hour}.type" in hourly
    paris = _sql(COARSE, query(COARSE, **SPRING, granularity="day", tz="Europe/Paris"))
    assert f"date_trunc('day', {hour}.bucket, 'Europe/Paris')" in paris
    daily = _sql(COARSE, query(COARSE, **SPRING, granularity="month"))
    assert "date_trunc('month', agg_events_by_type__day.bucket, 'UTC')" in daily
    kolkata = _sql(COARSE, query(COARSE, **SPRING, granularity="day", tz="Asia/Kolkata"))
    assert "FROM agg_events_by_type WHERE" in kolkata and "__" not in kolkata


def test_the_total_reads_the_same_table() -> None:
    q = query(COARSE, **SPRING, granularity="hour", fields="bucket,count", total="true")
    text = _sql(COARSE, q, total=True)
    assert "FROM agg_events_by_type__hour WHERE" in text and "date_trunc" not in text


def test_meta_names_the_table_that_answered() -> None:
    q = query(COARSE, **SPRING, granularity="week")
    source = COARSE.source(q)
    out = meta(q, 0, 0, None, (source.table.name, source.granularity))
    assert out["table"] == "agg_events_by_type__day" and out["table_granularity"] == "day"


def test_the_catalog_lists_stored_tables() -> None:
    info = {r.name: r for r in CATALOG.describe().data}["events_by_type"]
    assert info.granularity == "minute"
    assert info.stored_granularities == ["minute", "hour", "day"]
    assert info.tables == {
        "minute": "agg_events_by_type",
        "hour": "agg_events_by_type__hour",
        "day": "agg_events_by_type__day",
    }
    assert info.granularities == ["minute", "hour", "day", "week", "month"]
