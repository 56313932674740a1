"""Dashboard features over real Postgres and Redis: local-time buckets, totals, measure ranges,
statistics in `meta`, range limits and streamed CSV exports, each checked against an oracle."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import UTC, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest

from core.settings import Settings
from tests.integration.query_support import (
    DEFAULT_FIELDS,
    WHOLE,
    Row,
    exact,
    expected,
    query_api,
    sort_rows,
    trunc,
    walk,
    wire,
)

pytestmark = pytest.mark.integration

PATH = "/v1/rollups/events_by_type"
START, END = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 5, 1, tzinfo=UTC)
PARIS = ZoneInfo("Europe/Paris")


def paris_midnight(dt: datetime) -> datetime:
    """An independent oracle for Paris days: the local calendar date's midnight (Paris changes
    clocks at 02:00/03:00, so every midnight exists exactly once)."""
    return datetime.combine(dt.astimezone(PARIS).date(), time(0), tzinfo=PARIS)


async def test_days_in_a_time_zone_across_a_dst_change(loaded: tuple[Settings, list[Row]]) -> None:
    """The rows cross 2026-03-29, when Paris springs forward: a 23-hour day."""
    settings, rows = loaded
    async with query_api(settings) as http:
        response = await http.get(PATH, params={
            "from": "2026-03-01", "to": "2026-05-01", "tz": "Europe/Paris", "granularity": "day",
            "fields": "bucket,type,count,max_properties_amount"})
    assert response.status_code == 200, response.text
    body = exact(response)
    groups: dict[tuple[datetime, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((paris_midnight(r["bucket"]), r["type"]), []).append(r)
    want = [{"bucket": day.isoformat(), "type": kind, "count": sum(m["count"] for m in members),
             "max_properties_amount": max((m["max_properties_amount"] for m in members
                                           if m["max_properties_amount"] is not None), default=None)}
            for (day, kind), members in sorted(groups.items())]
    assert body["data"] == want
    assert {r["bucket"] for r in body["data"]} >= {"2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00"}
    # Bare dates are Paris midnights: the range starts at 2026-02-28T23:00Z.
    assert body["meta"]["from"] == "2026-02-28T23:00:00Z" and body["meta"]["tz"] == "Europe/Paris"


async def test_total_and_rows_read(loaded: tuple[Settings, list[Row]]) -> None:
    settings, rows = loaded
    params = {**WHOLE, "granularity": "day", "fields": "bucket,source,count", "limit": "4", "total": "true"}
    oracle = sort_rows(expected(rows, "day", ["bucket", "source", "count"], START, END), ["bucket", "source"])
    async with query_api(settings) as http:
        first = await http.get(PATH, params=params)
        second = await http.get(PATH, params={**params, "cursor": exact(first)["next_cursor"]})
        untotalled = await http.get(PATH, params={k: v for k, v in params.items() if k != "total"})
    for page, expected_rows in ((first, oracle[:4]), (second, oracle[4:8])):
        meta = exact(page)["meta"]
        assert meta["total"] == len(oracle) and page.headers["x-total-count"] == str(len(oracle))
        assert exact(page)["data"] == wire(expected_rows)
        # Stored rows merged into this page's rows, counted independently: the day table's
        # (the base rows re-bucketed, as the consumer keeps it) when the planner read it.
        keys = {(r["bucket"], r["source"]) for r in expected_rows}
        table = {(trunc(r["bucket"], meta["table_granularity"]), r["type"], r["source"]) for r in rows}
        assert meta["table_granularity"] in ("minute", "day")
        assert meta["rows_read"] == sum((trunc(b, "day"), s) in keys for b, _, s in table)
        assert meta["rows"] == 4 and meta["cache"] == "miss" and meta["query_ms"] > 0 and meta["elapsed_ms"] > 0
    assert "total" not in exact(untotalled)["meta"] and "x-total-count" not in untotalled.headers


@pytest.mark.parametrize(
    ("measure", "bounds", "keep"),
    [
        ("count", "gte:60,lt:200", lambda v: v is not None and 60 <= v < 200),
        ("max_properties_amount", "gt:50.5", lambda v: v is not None and v > 50.5),
        ("min_properties_amount", "lte:0", lambda v: v is not None and v <= 0),
        ("sum_properties_amount", "gte:1000,lte:2000", lambda v: v is not None and 1000 <= v <= 2000),
    ],
)
async def test_measure_ranges(loaded: tuple[Settings, list[Row]], measure: str, bounds: str, keep: Any) -> None:
    settings, rows = loaded
    fields = ["bucket", "type", "source", "count"]
    params = {**WHOLE, "granularity": "hour", "fields": ",".join(fields), f"filter[{measure}]": bounds,
              "limit": "5"}
    merged = expected(rows, "hour", [*fields, *([measure] if measure not in fields else [])], START, END)
    want = sort_rows([{f: r[f] for f in fields} for r in merged if keep(r[measure])], ["bucket", "type", "source"])
    assert want, "the bounds must select some rows"
    async with query_api(settings) as http:
        got, _ = await walk(http, PATH, params)
    assert got == wire(want)


async def test_range_limits_and_bad_zones_are_explained(loaded: tuple[Settings, list[Row]]) -> None:
    settings, _ = loaded
    async with query_api(settings) as http:
        year = await http.get(PATH, params={"from": "2025-01-01", "to": "2026-01-01"})
        hourly_year = await http.get(PATH, params={"from": "2025-01-01", "to": "2026-01-01", "granularity": "hour"})
        zone = await http.get(PATH, params={"tz": "Moon/Base", "granularity": "day"})
    assert year.status_code == 400 and year.headers["content-type"] == "application/problem+json"
    assert "spans about 525,600 minute buckets" in year.json()["detail"]
    assert hourly_year.status_code == 200 and exact(hourly_year)["data"] == []
    assert zone.status_code == 400 and "unknown time zone 'Moon/Base'" in zone.json()["detail"]


async def test_csv_export_streams_every_row_uncached(loaded: tuple[Settings, list[Row]]) -> None:
    """Past a page's limit, CSV is streamed from a server-side cursor and never stored in Redis."""
    settings, rows = loaded
    small_pages = settings.model_copy(update={"max_limit": 50, "default_limit": 50})
    params = {**WHOLE, "format": "csv", "limit": "100000", "total": "true"}
    async with query_api(small_pages) as http:
        async with http.stream("GET", PATH, params=params) as response:
            chunks = [chunk async for chunk in response.aiter_raw()]
        again = await http.get(PATH, params=params)
        page = await http.get(PATH, params={**params, "limit": "50"})
    assert response.status_code == 200 and response.headers["x-cache"] == "stream"
    assert response.headers["x-total-count"] == str(len(rows))  # every stored row is its own minute row
    assert "content-length" not in response.headers and response.headers["transfer-encoding"] == "chunked"
    assert response.headers["content-disposition"] == 'attachment; filename="events_by_type.csv"'
    lines = list(csv.reader(io.StringIO(b"".join(chunks).decode())))
    assert lines[0] == list(DEFAULT_FIELDS)
    oracle = sort_rows(expected(rows, "minute", DEFAULT_FIELDS, START, END), ["bucket", "type", "source"])
    assert lines[1:] == [["" if v is None else str(v) for v in r.values()] for r in wire(oracle)]
    assert again.headers["x-cache"] == "stream" and again.content == b"".join(chunks)
    assert page.headers["x-cache"] == "miss" and "x-next-cursor" in page.headers  # a page is cached as before


async def test_exports_beyond_the_bound_get_a_fast_503(loaded: tuple[Settings, list[Row]]) -> None:
    """An export holds a connection while it streams; past TALLY_MAX_EXPORTS a replica refuses at once."""
    settings, _ = loaded
    conn = await asyncpg.connect(str(settings.postgres_url))
    try:  # ~20 MB of CSV: more than the socket buffers hold, so an unread export stays open.
        await conn.execute(
            "INSERT INTO agg_events_by_type (bucket, type, source, count) SELECT timestamptz '2026-04-10'"
            " + make_interval(mins => g), 'bulk-' || (g % 7), 'src', 1 FROM generate_series(1, 300000) AS g")
    finally:
        await conn.close()
    one_at_a_time = settings.model_copy(
        update={"max_limit": 50, "default_limit": 50, "max_exports": 1, "max_buckets": 10**6}
    )
    params = {"from": "2026-04-05T00:00:00Z", "to": "2027-01-01T00:00:00Z", "format": "csv", "limit": "400000",
              "fields": "type,source,count", "granularity": "month"}
    export = {**params, "fields": "bucket,type,count", "granularity": "minute"}
    async with query_api(one_at_a_time) as http, httpx.AsyncClient(base_url=str(http.base_url), timeout=30) as other:
        async with http.stream("GET", PATH, params=export) as slow:
            assert slow.status_code == 200
            reader = slow.aiter_raw()
            first = await anext(reader)
            refused = await other.get(PATH, params=export)
            small = await other.get(PATH, params={**params, "limit": "10"})  # a cached page is not an export
            body = first + b"".join([chunk async for chunk in reader])
        await asyncio.sleep(0.2)
        after = await other.get(PATH, params={**export, "limit": "100"})
        async with http.stream("GET", PATH, params=export) as abandoned:  # a reader that goes away
            await anext(abandoned.aiter_raw())
        deadline, again = asyncio.get_running_loop().time() + 5, None
        while asyncio.get_running_loop().time() < deadline:
            again = await other.get(PATH, params={**export, "limit": "100"})
            if again.status_code == 200:
                break
            await asyncio.sleep(0.1)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert "exports are already running" in refused.json()["detail"]
    assert small.status_code == 200 and small.headers["x-cache"] == "miss"
    assert len(body) > 9_000_000 and body.count(b"\r\n") == 1 + 300_000  # the header and every bulk row
    assert after.status_code == 200 and after.headers["x-cache"] == "stream"  # the slot was given back
    assert again is not None and again.status_code == 200  # also by an export whose reader left mid-way
