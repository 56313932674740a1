"""Rendering: Decimals as exact JSON numbers, RFC 3339 buckets with Z, columns and CSV."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

from core.settings import DEFAULT_ROLLUPS
from query.params import Limits, RollupQuery, parse_query
from query.render import csv_header, csv_rows, render, serving
from schemas.rollups import load_rollups

SPEC = {s.name: s for s in load_rollups(DEFAULT_ROLLUPS)}["events_by_type"]
NOW = datetime(2026, 11, 25, 13, 37, 42, tzinfo=UTC)
ROWS = [
    (datetime(2026, 11, 25, 13, tzinfo=UTC), "buy", Decimal("3"), Decimal("0.30000000000000000001")),
    (datetime(2026, 11, 25, 14, tzinfo=UTC), "view, \"quoted\"", Decimal("12345678901234567890"), None),
]


def query(fmt: str, *extra: tuple[str, str]) -> RollupQuery:
    return parse_query(SPEC, [("fields", "bucket,type,count,sum_properties_amount"), ("format", fmt),
                              ("granularity", "hour"), *extra], Limits(1_000, 10_000, 100_000), NOW)


def test_json_rows_are_exact() -> None:
    out = render(query("json"), ROWS, "next", rows_read=9, total=None)
    assert out.media_type == "application/json"
    doc = json.loads(out.body, parse_float=Decimal)
    assert doc["data"][0] == {"bucket": "2026-11-25T13:00:00Z", "type": "buy", "count": 3,
                              "sum_properties_amount": Decimal("0.30000000000000000001")}
    assert doc["data"][1]["count"] == 12345678901234567890 and doc["data"][1]["sum_properties_amount"] is None
    assert doc["next_cursor"] == "next"
    assert doc["meta"] == {
        "rollup": "events_by_type", "granularity": "hour", "tz": "UTC", "from": "2026-11-24T13:00:00Z",
        "to": "2026-11-25T14:00:00Z", "fields": ["bucket", "type", "count", "sum_properties_amount"], "filters": {},
        "order": ["bucket", "type"], "limit": 1_000, "rows": 2, "rows_read": 9,
    }
    assert "total" not in doc["meta"]
    assert json.loads(render(query("json", ("total", "true")), ROWS, None, rows_read=9, total=40).body)["meta"][
        "total"] == 40


def test_serving_appends_to_meta_without_reparsing() -> None:
    body = render(query("json", ("filter[count]", "gte:2,lt:5")), ROWS, None, rows_read=3, total=None).body
    served = serving(body, {"cache": "hit", "age": 4, "elapsed_ms": 0.25})
    assert served.startswith(body[:-2])
    doc = json.loads(served)
    assert doc["meta"]["cache"] == "hit" and doc["meta"]["age"] == 4 and doc["meta"]["elapsed_ms"] == 0.25
    assert doc["meta"]["filters"] == {"count": ["gte:2", "lt:5"]}
    assert list(doc) == ["data", "next_cursor", "meta"] and doc["data"] == json.loads(body)["data"]


def test_buckets_in_the_query_time_zone() -> None:
    rows = [(datetime(2026, 3, 28, 23, tzinfo=UTC), "buy", Decimal(1), None),  # Paris midnight, winter
            (datetime(2026, 3, 29, 22, tzinfo=UTC), "buy", Decimal(1), None)]  # Paris midnight, summer
    q = query("json", ("tz", "Europe/Paris"))
    assert [r["bucket"] for r in json.loads(render(q, rows, None, rows_read=2, total=None).body)["data"]] == [
        "2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00"]
    csv = render(query("csv", ("tz", "Europe/Paris")), rows, None, rows_read=2, total=None).body.decode()
    assert csv.split("\r\n")[1:3] == ["2026-03-29T00:00:00+01:00,buy,1,", "2026-03-30T00:00:00+02:00,buy,1,"]


def test_columns() -> None:
    doc = json.loads(render(query("columns"), ROWS, None, rows_read=2, total=None).body, parse_float=Decimal)
    assert doc["data"]["type"] == ["buy", "view, \"quoted\""]
    assert doc["data"]["sum_properties_amount"] == [Decimal("0.30000000000000000001"), None]
    assert doc["next_cursor"] is None


def test_csv() -> None:
    out = render(query("csv"), ROWS, None, rows_read=2, total=None)
    assert out.media_type.startswith("text/csv")
    assert out.body.decode().split("\r\n") == [
        "bucket,type,count,sum_properties_amount",
        "2026-11-25T13:00:00Z,buy,3,0.30000000000000000001",
        '2026-11-25T14:00:00Z,"view, ""quoted""",12345678901234567890,',
        "",
    ]
    assert csv_header(query("csv")) + csv_rows(query("csv"), ROWS) == out.body
