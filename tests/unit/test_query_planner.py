"""The planner's SQL shape, compiled for PostgreSQL: re-bucketing, exact merges, keyset with NULLs."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy.dialects import postgresql

from core.settings import DEFAULT_ROLLUPS
from query.catalog import Catalog
from query.cursor import Value
from query.params import Limits, parse_query
from query.planner import count_plan, order_kinds, plan
from schemas.rollups import load_rollups

NOW = datetime(2026, 11, 25, 13, 37, 42, tzinfo=UTC)
ROLLUP = Catalog(load_rollups(DEFAULT_ROLLUPS)).get("events_by_type")
T = "agg_events_by_type"


def sql(query: dict[str, str], cursor: tuple[Value, ...] | None = None) -> str:
    q = parse_query(ROLLUP.spec, list(query.items()), Limits(1_000, 10_000, 100_000), NOW)
    compiled = plan(ROLLUP.spec, ROLLUP.table, q, cursor).compile(dialect=postgresql.dialect())
    return re.sub(r"\s+", " ", str(compiled))


def test_rebucketing_and_exact_merges() -> None:
    text = sql({"granularity": "hour"})
    assert f"date_trunc('hour', {T}.bucket, 'UTC') AS bucket" in text
    assert f"GROUP BY date_trunc('hour', {T}.bucket, 'UTC'), {T}.type, {T}.source" in text
    assert f"sum({T}.count) AS count" in text
    assert f"sum({T}.sum_properties_amount) AS sum_properties_amount" in text
    assert f"min({T}.min_properties_amount) AS min_properties_amount" in text
    assert f"max({T}.max_properties_amount) AS max_properties_amount" in text
    assert text.startswith("SELECT sub.bucket, sub.type, sub.source, sub.count")
    assert "ORDER BY sub.bucket ASC NULLS LAST, sub.type ASC NULLS LAST, sub.source ASC NULLS LAST" in text
    assert "LIMIT %(param_1)s" in text
    # The range is on the stored bucket (an index range scan), both ends bound parameters.
    assert f"{T}.bucket >= %(bucket_1)s" in text and f"{T}.bucket < %(bucket_2)s" in text


def test_table_granularity_needs_no_date_trunc() -> None:
    text = sql({"granularity": "minute"})
    assert "date_trunc" not in text
    assert f"GROUP BY {T}.bucket, {T}.type, {T}.source" in text


def test_only_selected_columns_are_grouped() -> None:
    text = sql({"fields": "source,count", "granularity": "week"})
    assert "date_trunc" not in text
    assert f"GROUP BY {T}.source" in text
    assert text.startswith('SELECT sub.source, sub.count, sub."stored rows" FROM (SELECT')
    totals = sql({"fields": "count,max_properties_amount"})
    assert "GROUP BY" not in totals and "HAVING count(*) >" in totals


def test_filters_are_bound_in_lists() -> None:
    text = sql({"filter[type]": "x');DROP TABLE t;--", "filter[source]": "a,b"})
    assert "DROP TABLE" not in text
    assert f"{T}.source IN (__[POSTCOMPILE_source_1])" in text
    assert f"{T}.type IN (__[POSTCOMPILE_type_1])" in text


def test_keyset_predicate_over_the_grouped_subquery_with_nulls_last() -> None:
    query = {"fields": "bucket,type,sum_properties_amount", "order": "-sum_properties_amount", "granularity": "day"}
    text = sql(query, (Decimal("5"), datetime(2026, 11, 24, tzinfo=UTC), "click"))
    where = text.split(") AS sub WHERE ", 1)[1].split(" ORDER BY ", 1)[0]
    assert where == (
        "sub.sum_properties_amount < %(sum_properties_amount_1)s OR sub.sum_properties_amount IS NULL"
        " OR sub.sum_properties_amount = %(sum_properties_amount_2)s"
        " AND sub.bucket > %(bucket_3)s::TIMESTAMP WITH TIME ZONE"
        " OR sub.sum_properties_amount = %(sum_properties_amount_3)s"
        " AND sub.bucket = %(bucket_4)s::TIMESTAMP WITH TIME ZONE AND sub.type > %(type_1)s::VARCHAR"
    )
    assert "ORDER BY sub.sum_properties_amount DESC NULLS LAST, sub.bucket ASC NULLS LAST" in text
    # After a NULL: nothing sorts after NULL in that column, so only ties on NULL continue.
    after_null = sql(query, (None, datetime(2026, 11, 24, tzinfo=UTC), "click"))
    where = after_null.split(") AS sub WHERE ", 1)[1].split(" ORDER BY ", 1)[0]
    assert where.startswith("sub.sum_properties_amount IS NULL AND sub.bucket > ")
    assert "sub.sum_properties_amount <" not in where


def test_offset_and_kinds() -> None:
    assert "OFFSET %(param_2)s" in sql({"offset": "20"})
    q = parse_query(ROLLUP.spec, [("order", "-count,type")], Limits(1_000, 10_000, 100_000), NOW)
    assert order_kinds(ROLLUP.spec, q.order) == ("number", "text", "time", "text")


def test_time_zone_truncates_days_but_not_hours() -> None:
    assert "date_trunc('day', agg_events_by_type.bucket, 'Europe/Paris')" in sql(
        {"granularity": "day", "tz": "Europe/Paris"})
    assert "date_trunc('hour', agg_events_by_type.bucket, 'UTC')" in sql({"granularity": "hour", "tz": "Asia/Kolkata"})


def test_measure_ranges_filter_merged_values_even_when_not_returned() -> None:
    text = sql({"fields": "type,count", "filter[max_properties_amount]": "gte:1,lt:2.5"})
    assert f"max({T}.max_properties_amount) AS max_properties_amount" in text
    assert "WHERE sub.max_properties_amount >= %(max_properties_amount_1)s" in text
    assert "AND sub.max_properties_amount < %(max_properties_amount_2)s" in text
    assert text.startswith('SELECT sub.type, sub.count, sub."stored rows" FROM')


def test_total_counts_the_grouped_rows() -> None:
    q = parse_query(ROLLUP.spec, [("fields", "type,count"), ("filter[count]", "gt:5"), ("total", "true")],
                    Limits(1_000, 10_000, 100_000), NOW)
    text = re.sub(r"\s+", " ", str(count_plan(ROLLUP.spec, ROLLUP.table, q).compile(dialect=postgresql.dialect())))
    assert text.startswith('SELECT count(*) AS count_1, coalesce(sum(sub."stored rows"), %(coalesce_2)s::INTEGER)')
    assert f"GROUP BY {T}.type) AS sub WHERE sub.count > %(count_2)s" in text and "LIMIT" not in text
