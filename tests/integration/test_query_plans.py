"""Common dashboard queries read `agg_events_by_type` through its indexes, never by a Seq Scan.

The planner's SQL for each query shape is compiled with literal binds (the values a custom
plan sees) and run under EXPLAIN (ANALYZE, FORMAT JSON) on 150,000 seeded rows (1,000 minutes
x 10 types x 15 sources, ANALYZEd). Each range is 3 h, 18 % of this table and a far smaller
share of a real one, which holds months: a shape whose conditions no index can serve (an
index missing from schemas.tables, a condition the planner wraps in a function) shows up as
a Seq Scan here. (Postgres 18 turns to a Seq Scan only past about 40 % of this table.) The
test also checks that the time range bounds the index search instead of filtering rows
after reading them, and that the scans return exactly the stored rows the query needs.
See docs/query-plans.md for the plans on 1.5M rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from sqlalchemy.dialects import postgresql

from bench.rollup_seed import TABLE, plain_url, seed_rollup
from core.settings import Settings
from query.catalog import Catalog
from query.params import Limits, parse_query
from query.planner import plan

pytestmark = pytest.mark.integration

END = datetime(2026, 3, 1, tzinfo=UTC)
ROWS = 150_000  # 1,000 minutes (2026-02-28 07:20 to 2026-03-01 00:00) x 150 (type, source) pairs
FROM, TO = "2026-02-28T12:00:00Z", "2026-02-28T15:00:00Z"  # 3 h: 180 minutes, 18 % of the table
INDEX_SCANS = frozenset({"Index Scan", "Index Only Scan", "Bitmap Heap Scan"})  # Bitmap Index Scans feed the last


@dataclass(frozen=True)
class Shape:
    name: str
    params: tuple[tuple[str, str], ...]
    stored_rows: int  # rows of the table in the range that pass the filters
    groups: int  # rows of the answer: at most one page, so no LIMIT stops a scan early
    indexed: tuple[str, ...]  # dimensions at least one of which must be an index condition


SHAPES = (
    Shape(
        "3h_one_dimension",
        (
            ("from", FROM),
            ("to", TO),
            ("fields", "bucket,count,sum_properties_amount"),
            ("filter[type]", "purchase"),
        ),
        180 * 15,
        180,
        ("type",),
    ),
    Shape(
        "3h_two_dimensions",
        (
            ("from", FROM),
            ("to", TO),
            ("fields", "bucket,type,source,count"),
            ("filter[type]", "purchase,add_to_cart"),
            ("filter[source]", "ios,android"),
        ),
        180 * 2 * 2,
        180 * 2 * 2,
        ("type", "source"),
    ),
    Shape(
        "3h_hourly_no_filter",
        (("from", FROM), ("to", TO), ("granularity", "hour"), ("fields", "bucket,type,count,sum_properties_amount")),
        180 * 150,
        3 * 10,
        (),
    ),
)


def planned_sql(settings: Settings, params: tuple[tuple[str, str], ...]) -> str:
    """The planner's statement for `params`, with its values inlined as a custom plan sees them."""
    rollup = Catalog(settings.rollups).get("events_by_type")
    limits = Limits(default_limit=settings.default_limit, max_limit=settings.max_limit, max_offset=settings.max_offset)
    q = parse_query(rollup.spec, params, limits, END)
    stmt = plan(rollup.spec, rollup.table, q)
    return str(stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))


def nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


async def explain(settings: Settings, sql: str) -> dict[str, Any]:
    conn = await asyncpg.connect(plain_url(str(settings.postgres_url)))
    try:
        await conn.execute("SET TIME ZONE 'UTC'")  # literals in conditions print as ...+00
        raw = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")
    finally:
        await conn.close()
    root: dict[str, Any] = json.loads(raw)[0]["Plan"]
    return root


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
async def test_dashboard_query_reads_through_an_index(migrated: Settings, shape: Shape) -> None:
    seeded = await seed_rollup(str(migrated.postgres_url), ROWS, end=END)
    assert (seeded.start, seeded.rows_per_minute) == (datetime(2026, 2, 28, 7, 20, tzinfo=UTC), 150)
    root = await explain(migrated, planned_sql(migrated, shape.params))
    everything = list(nodes(root))

    scans = [n for n in everything if n.get("Relation Name") == TABLE]
    kinds = sorted({n["Node Type"] for n in scans})
    assert scans, f"no scan of {TABLE} in the plan"
    assert set(kinds) <= INDEX_SCANS, f"{shape.name}: {TABLE} is read by {kinds}"
    assert all(n["Node Type"] != "Seq Scan" for n in everything)

    # The scans hand up exactly the stored rows the query needs (the test's own arithmetic).
    assert sum(n["Actual Rows"] * n["Actual Loops"] for n in scans) == shape.stored_rows
    assert root["Actual Rows"] == shape.groups

    # The time range bounds the index search itself: both ends are index conditions.
    conditions = [n["Index Cond"] for n in everything if "Index Cond" in n]
    assert conditions, "no index condition anywhere in the plan"
    assert all("(bucket >= '2026-02-28 12:00:00+00'::timestamp with time zone)" in c for c in conditions), conditions
    assert all("(bucket < '2026-02-28 15:00:00+00'::timestamp with time zone)" in c for c in conditions), conditions
    if shape.indexed:
        assert any(f"({dim} = " in c for c in conditions for dim in shape.indexed), conditions
