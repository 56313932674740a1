"""Ranking in Python (query.derived, for orders and bounds on sketch fields) against SQL's own paging.

Queries ordered or range-filtered by a sketch field cannot be paged by Postgres, so query.derived
applies the bounds, the total order (NULLs last both ways), the keyset cursor, the offset and the
limit itself. Here SQL is the oracle: random queries over the stored rows of `make_rows` (NULL
sums/mins/maxes, ties, every granularity) whose order and bounds SQL can run, walked page by page
through their cursors once as SQL pages them and once forced through the Python path
(`in_python=True`): every page, every cursor and the total must be the same.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import create_async_engine

from core.db import asyncpg_url
from core.settings import Settings
from query.catalog import Catalog
from query.derived import finish
from query.params import Limits, RollupQuery, parse_query
from query.planner import count_plan, plan
from tests.integration.query_support import DIMS, MEASURES, Row

pytestmark = pytest.mark.integration

NOW = datetime(2026, 4, 10, tzinfo=UTC)
LIMITS = Limits(default_limit=100, max_limit=1000, max_offset=1000)


@st.composite
def queries(draw: st.DrawFn) -> list[tuple[str, str]]:
    fields = draw(st.lists(st.sampled_from(["bucket", *DIMS, *MEASURES]), min_size=1, max_size=5, unique=True))
    if draw(st.booleans()) and "type" not in fields:  # per type, the views' amounts are NULL: NULLs to order
        fields.append("type")
    items = [
        ("fields", ",".join(fields)),
        ("from", "2026-03-28T00:00:00Z"),
        ("to", "2026-04-03T00:00:00Z"),
        ("granularity", draw(st.sampled_from(["minute", "hour", "day", "week"]))),
        ("limit", str(draw(st.integers(1, 40)))),
        ("total", "true"),
    ]
    order = draw(st.lists(st.sampled_from(fields), unique=True, max_size=len(fields)))
    if order:
        items.append(("order", ",".join(("-" if draw(st.booleans()) else "") + c for c in order)))
    for measure in draw(st.lists(st.sampled_from(MEASURES), unique=True, max_size=2)) if draw(st.booleans()) else ():
        op = draw(st.sampled_from(["gt", "gte", "lt", "lte"]))
        items.append((f"filter[{measure}]", f"{op}:{draw(st.integers(-5, 300))}"))
    if draw(st.booleans()):
        items.append(("filter[type]", ",".join(draw(st.lists(st.sampled_from(["buy", "click", "view"]), min_size=1)))))
    if draw(st.integers(0, 3)) == 0:
        items.append(("offset", str(draw(st.integers(1, 5)))))
    return items


async def _walk(conn: Any, catalog: Catalog, q: RollupQuery) -> tuple[list[list[tuple[Any, ...]]], int | None]:
    """Every page of `q` through its cursors, as query.service runs them; and the total."""
    rollup = catalog.get(q.rollup)
    source = rollup.source(q)
    pages: list[list[tuple[Any, ...]]] = []
    after = None
    total = None
    for _ in range(500):
        page = finish(
            rollup.spec,
            q,
            (await conn.execute(plan(rollup.spec, source.table, q, after, stored=source.granularity))).all(),
            after,
        )
        if total is None:
            total = (
                page.matched
                if q.in_python
                else int(
                    (await conn.execute(count_plan(rollup.spec, source.table, q, stored=source.granularity))).one()[0]
                )
            )
        rows = page.rows[: q.limit]
        pages.append(rows)
        if len(page.rows) <= q.limit:
            return pages, total
        index = {f: i for i, f in enumerate(q.fields)}
        after = tuple(rows[-1][index[o.column]] for o in q.order)
        q = dataclasses.replace(q, offset=0)  # a cursor walk continues without the first page's offset
    raise AssertionError("the walk did not end")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=queries())
async def test_python_ranking_pages_exactly_as_sql(
    loaded: tuple[Settings, list[Row]], items: list[tuple[str, str]]
) -> None:
    settings_, _rows = loaded
    catalog = Catalog(settings_.rollups)
    spec = catalog.get("events_by_type").spec
    q = parse_query(spec, items, LIMITS, NOW)
    assert not q.in_python
    engine = create_async_engine(asyncpg_url(str(settings_.postgres_url)))
    try:
        async with engine.connect() as conn:
            by_sql = await _walk(conn, catalog, q)
            in_python = await _walk(conn, catalog, dataclasses.replace(q, in_python=True))
    finally:
        await engine.dispose()
    assert in_python == by_sql, items


async def test_a_sketch_order_or_bound_ranks_in_python(loaded: tuple[Settings, list[Row]]) -> None:
    settings_, _rows = loaded
    spec = Catalog(settings_.rollups).get("events_by_type").spec
    assert parse_query(spec, [("fields", "type,uniq_user_id"), ("order", "-uniq_user_id")], LIMITS, NOW).in_python
    assert parse_query(spec, [("fields", "type"), ("filter[p95_properties_amount]", "gte:1")], LIMITS, NOW).in_python
    assert not parse_query(spec, [("fields", "type,uniq_user_id"), ("order", "-type")], LIMITS, NOW).in_python
    assert not parse_query(
        spec, [("fields", "type,avg_properties_amount"), ("order", "-avg_properties_amount")], LIMITS, NOW
    ).in_python

