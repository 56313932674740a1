"""The query API over real Postgres and Redis: exact re-bucketing, selection, filters, order,
paging (offset and cursor), formats and errors, checked against an independent oracle."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from decimal import Decimal

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


async def test_list_rollups(migrated: Settings) -> None:
    async with query_api(migrated) as http:
        response = await http.get("/v1/rollups")
    assert response.status_code == 200
    by_name = {r["name"]: r for r in response.json()["data"]}
    events = by_name["events_by_type"]
    assert events["table"] == "agg_events_by_type"
    assert events["granularities"] == ["minute", "hour", "day", "week", "month"]
    assert [d["name"] for d in events["dimensions"]] == ["type", "source"]
    assert {m["name"]: m["merge"] for m in events["measures"]} == {
        "count": "sum", "sum_properties_amount": "sum", "min_properties_amount": "min",
        "max_properties_amount": "max", "uniq_user_id": "union", "quantiles_properties_amount": "union",
    }
    assert [m["precision"] for m in events["measures"]] == [None, None, None, None, 15, 400]
    fields = ["count", "sum_properties_amount", "min_properties_amount", "max_properties_amount", "uniq_user_id",
              "p50_properties_amount", "p95_properties_amount", "p99_properties_amount", "avg_properties_amount"]
    assert events["fields"] == fields
    assert events["filterable"] == ["type", "source", *fields]
    assert events["retention"] is None  # nothing is deleted yet: buckets are kept indefinitely
    assert by_name["page_views"]["where"] == {"type": ["page_view"]}
    assert [d["name"] for d in by_name["page_views"]["dimensions"]] == ["properties_country", "properties_path"]


@pytest.mark.parametrize("granularity", ["minute", "hour", "day", "week", "month"])
async def test_rebucketing_is_exact(loaded: tuple[Settings, list[Row]], granularity: str) -> None:
    settings, rows = loaded
    async with query_api(settings) as http:
        response = await http.get(PATH, params={**WHOLE, "granularity": granularity})
    assert response.status_code == 200, response.text
    doc = exact(response)
    want = sort_rows(expected(rows, granularity, DEFAULT_FIELDS, START, END), ["bucket", "type", "source"])
    assert doc["data"] == wire(want)
    assert doc["next_cursor"] is None
    assert doc["meta"]["granularity"] == granularity
    assert doc["meta"]["rows"] == len(want)
    assert doc["meta"]["fields"] == list(DEFAULT_FIELDS)
    assert doc["meta"]["from"] == wire([{"from": trunc(START, granularity)}])[0]["from"]  # floored


async def test_range_alignment(loaded: tuple[Settings, list[Row]]) -> None:
    settings, rows = loaded
    async with query_api(settings) as http:
        # from floored, to ceiled to the hour; rows are buckets starting in [from, to).
        hourly = exact(await http.get(PATH, params={
            "from": "2026-03-29T10:17:00+00:00", "to": "2026-03-31T05:03:00Z", "granularity": "hour"}))
        # A week starts on Monday: from on Sunday 03-29 reaches back to Monday 03-23.
        weekly = exact(await http.get(PATH, params={
            "from": "2026-03-29T12:00:00Z", "to": "2026-03-30T00:00:00Z", "granularity": "week",
            "fields": "bucket,count"}))
    lo, hi = datetime(2026, 3, 29, 10, tzinfo=UTC), datetime(2026, 3, 31, 6, tzinfo=UTC)
    assert (hourly["meta"]["from"], hourly["meta"]["to"]) == ("2026-03-29T10:00:00Z", "2026-03-31T06:00:00Z")
    hours = expected(rows, "hour", DEFAULT_FIELDS, lo, hi)
    assert hourly["data"] == wire(sort_rows(hours, ["bucket", "type", "source"]))
    assert (weekly["meta"]["from"], weekly["meta"]["to"]) == ("2026-03-23T00:00:00Z", "2026-03-30T00:00:00Z")
    week = expected(rows, "week", ["bucket", "count"], datetime(2026, 3, 23, tzinfo=UTC),
                    datetime(2026, 3, 30, tzinfo=UTC))
    assert weekly["data"] == wire(week) and len(week) == 1


async def test_fields_select_and_group_only_those(loaded: tuple[Settings, list[Row]]) -> None:
    settings, rows = loaded
    async with query_api(settings) as http:
        by_source = exact(await http.get(PATH, params={**WHOLE, "granularity": "day",
                                                       "fields": "source,bucket,count,max_properties_amount"}))
        totals = exact(await http.get(PATH, params={**WHOLE, "fields": "count,sum_properties_amount,"
                                                                       "min_properties_amount"}))
        per_type = exact(await http.get(PATH, params={**WHOLE, "fields": "type,count"}))
        empty = exact(await http.get(PATH, params={"from": "2020-01-01T00:00:00Z", "to": "2020-01-02T00:00:00Z",
                                                   "fields": "count"}))
    fields = ["source", "bucket", "count", "max_properties_amount"]
    assert by_source["data"] == wire(sort_rows(expected(rows, "day", fields, START, END), ["bucket", "source"]))
    assert list(by_source["data"][0]) == fields  # the client's column order
    total = expected(rows, "minute", ["count", "sum_properties_amount", "min_properties_amount"], START, END)
    assert totals["data"] == total and len(total) == 1
    assert totals["data"][0]["count"] == sum(r["count"] for r in rows)
    assert per_type["data"] == sort_rows(expected(rows, "minute", ["type", "count"], START, END), ["type"])
    assert empty["data"] == []  # totals over an empty range: no row, not a row of NULLs


async def test_filters(loaded: tuple[Settings, list[Row]]) -> None:
    settings, rows = loaded
    async with query_api(settings) as http:
        picked = exact(await http.get(PATH, params={**WHOLE, "granularity": "hour", "filter[type]": "buy,click",
                                                    "filter[source]": "web"}))
        missing_source = exact(await http.get(PATH, params={**WHOLE, "fields": "type,count",
                                                            "filter[source]": ""}))
        nothing = exact(await http.get(PATH, params={**WHOLE, "filter[type]": "x') OR 1=1 --"}))
    want = expected(rows, "hour", DEFAULT_FIELDS, START, END, {"type": ["buy", "click"], "source": ["web"]})
    assert picked["data"] == wire(sort_rows(want, ["bucket", "type", "source"]))
    assert picked["meta"]["filters"] == {"source": ["web"], "type": ["buy", "click"]}
    assert missing_source["data"] == sort_rows(
        expected(rows, "minute", ["type", "count"], START, END, {"source": [""]}), ["type"])
    assert nothing["data"] == []


async def test_order_limit_offset(loaded: tuple[Settings, list[Row]]) -> None:
    settings, rows = loaded
    params = {**WHOLE, "granularity": "day", "fields": "bucket,type,count,sum_properties_amount"}
    async with query_api(settings) as http:
        top = exact(await http.get(PATH, params={**params, "order": "-count,bucket", "limit": "5"}))
        by_sum = exact(await http.get(PATH, params={**params, "order": "-sum_properties_amount"}))
        page2 = exact(await http.get(PATH, params={**params, "order": "-count", "limit": "4", "offset": "4"}))
    full = expected(rows, "day", ["bucket", "type", "count", "sum_properties_amount"], START, END)
    by_count = sort_rows(full, ["-count", "bucket", "type"])
    assert top["data"] == wire(by_count[:5])
    assert top["meta"]["order"] == ["-count", "bucket", "type"]
    assert top["next_cursor"] is not None
    want_sum = wire(sort_rows(full, ["-sum_properties_amount", "bucket", "type"]))
    assert by_sum["data"] == want_sum
    assert by_sum["data"][-1]["sum_properties_amount"] is None  # NULLs last, even descending
    assert page2["data"] == wire(by_count[4:8]) and page2["meta"]["offset"] == 4


@pytest.mark.parametrize(
    ("params", "order"),
    [
        ({"granularity": "minute"}, ["bucket", "type", "source"]),
        ({"granularity": "hour", "fields": "bucket,type,sum_properties_amount", "order": "-sum_properties_amount"},
         ["-sum_properties_amount", "bucket", "type"]),
        ({"granularity": "hour", "fields": "type,bucket,min_properties_amount,count",
          "order": "min_properties_amount,-count"}, ["min_properties_amount", "-count", "bucket", "type"]),
        ({"granularity": "day", "fields": "source,type,count", "order": "-count", "filter[type]": "buy,view"},
         ["-count", "source", "type"]),
    ],
)
async def test_cursor_walk_visits_every_row_once(loaded: tuple[Settings, list[Row]], params: dict[str, str],
                                                 order: list[str]) -> None:
    settings, rows = loaded
    fields = params.get("fields", ",".join(DEFAULT_FIELDS)).split(",")
    filters = {"type": params["filter[type]"].split(",")} if "filter[type]" in params else None
    want = wire(sort_rows(expected(rows, params["granularity"], fields, START, END, filters), order))
    async with query_api(settings) as http:
        got, pages = await walk(http, PATH, {**WHOLE, **params, "limit": "7"})
    assert got == want
    assert pages == max(1, -(-len(want) // 7))  # limit + 1 fetch: no empty last page
    if "sum" in params.get("order", "") or "min" in params.get("order", ""):
        assert any(r[order[0].lstrip("-")] is None for r in got)  # the walk crossed NULLs


async def test_cursor_survives_a_moving_clock(loaded: tuple[Settings, list[Row]]) -> None:
    """A relative range is pinned by the cursor: later pages do not slide with `now`."""
    settings, _ = loaded
    async with query_api(settings) as http:
        # Totals (no bucket): 400 days of minute buckets are more than a query may group by.
        params = {"from": "-400d", "to": "now", "limit": "3", "fields": "type,source,count"}
        first = exact(await http.get(PATH, params=params))
        second = await http.get(PATH, params={**params, "cursor": first["next_cursor"]})
    assert second.status_code == 200
    assert exact(second)["meta"]["from"] == first["meta"]["from"]


async def test_errors(loaded: tuple[Settings, list[Row]]) -> None:
    settings, _ = loaded
    async with query_api(settings) as http:
        page = exact(await http.get(PATH, params={**WHOLE, "limit": "3"}))
        cursor = page["next_cursor"]
        head, _, sig = cursor.partition(".")
        cases = {
            "tampered": (await http.get(PATH, params={**WHOLE, "limit": "3", "cursor": head[:-2] + "xx." + sig}),
                         400, "cursor"),
            "foreign": (await http.get(PATH, params={**WHOLE, "order": "-count", "cursor": cursor}), 400, "cursor"),
            "offset+cursor": (await http.get(PATH, params={**WHOLE, "cursor": cursor, "offset": "3"}), 400, "offset"),
            "rollup": (await http.get("/v1/rollups/nope"), 404, "nope"),
            "field": (await http.get(PATH, params={"fields": "bucket,revenue"}), 400, "revenue"),
            "filter": (await http.get(PATH, params={"filter[country]": "de"}), 400, "country"),
            "order": (await http.get(PATH, params={"order": "-revenue"}), 400, "revenue"),
            "unselected": (await http.get(PATH, params={"fields": "type", "order": "count"}), 400, "count"),
            "param": (await http.get(PATH, params={"sort": "count"}), 400, "sort"),
            "granularity": (await http.get(PATH, params={"granularity": "second"}), 400, "granularity"),
            "limit": (await http.get(PATH, params={"limit": "10001"}), 400, "limit"),
            "offset": (await http.get(PATH, params={"offset": "100001"}), 400, "offset"),
            "time": (await http.get(PATH, params={"from": "last tuesday"}), 400, "from"),
            "injection": (await http.get(PATH, params={"fields": "count); DROP TABLE agg_events_by_type; --"}),
                          400, "DROP TABLE"),
        }
        still_there = await http.get(PATH, params={**WHOLE, "fields": "count"})
    for name, (response, status, named) in cases.items():
        assert response.status_code == status, (name, response.text)
        assert response.headers["content-type"] == "application/problem+json", name
        assert named in response.json()["detail"], (name, response.json())
    assert exact(still_there)["data"][0]["count"] > 0


async def test_formats(loaded: tuple[Settings, list[Row]]) -> None:
    settings, rows = loaded
    params = {**WHOLE, "granularity": "hour", "fields": "bucket,source,sum_properties_amount,count", "limit": "50"}
    async with query_api(settings) as http:
        as_rows = exact(await http.get(PATH, params=params))
        as_columns = await http.get(PATH, params={**params, "format": "columns"})
        as_csv = await http.get(PATH, params={**params, "format": "csv"})
    columns = exact(as_columns)
    assert list(columns["data"]) == ["bucket", "source", "sum_properties_amount", "count"]
    assert columns["data"]["count"] == [r["count"] for r in as_rows["data"]]
    assert columns["data"]["sum_properties_amount"] == [r["sum_properties_amount"] for r in as_rows["data"]]
    assert columns["next_cursor"] == as_rows["next_cursor"] is not None
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert as_csv.headers["x-next-cursor"] == as_rows["next_cursor"]
    table = list(csv.reader(io.StringIO(as_csv.text)))
    assert table[0] == ["bucket", "source", "sum_properties_amount", "count"]
    assert len(table) == 51
    for line, row in zip(table[1:], as_rows["data"], strict=True):
        assert line[0] == row["bucket"] and line[1] == row["source"]
        assert (Decimal(line[2]) if line[2] else None) == row["sum_properties_amount"]
        assert int(line[3]) == row["count"]
    want = expected(rows, "hour", ["bucket", "source", "sum_properties_amount", "count"], START, END)
    assert as_rows["data"] == wire(sort_rows(want, ["bucket", "source"]))[:50]


async def test_oversized_headers_are_a_431_problem(migrated: Settings) -> None:
    """uvicorn bounds no header size: the query API refuses them itself, as ingest does."""
    async with query_api(migrated.model_copy(update={"max_header_bytes": 2048})) as http:
        refused = await http.get("/v1/rollups", headers={"x-pad": "a" * 4096})
        passed = await http.get("/v1/rollups", headers={"x-pad": "a" * 1024})
    assert refused.status_code == 431
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["status"] == 431 and "limit is 2048 (TALLY_MAX_HEADER_BYTES)" in problem["detail"]
    assert passed.status_code == 200
