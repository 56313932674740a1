"""Rendering: Decimals as exact JSON numbers, RFC 3339 buckets with Z, columns and CSV."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

from core.settings import DEFAULT_ROLLUPS
from query.params import Limits, RollupQuery, parse_query
from query.render import render
from schemas.rollups import load_rollups

SPEC = {s.name: s for s in load_rollups(DEFAULT_ROLLUPS)}["events_by_type"]
NOW = datetime(2026, 11, 25, 13, 37, 42, tzinfo=UTC)
ROWS = [
    (datetime(2026, 11, 25, 13, tzinfo=UTC), "buy", Decimal("3"), Decimal("0.30000000000000000001")),
    (datetime(2026, 11, 25, 14, tzinfo=UTC), "view, \"quoted\"", Decimal("12345678901234567890"), None),
]


def query(fmt: str) -> RollupQuery:
    return parse_query(SPEC, [("fields", "bucket,type,count,sum_properties_amount"), ("format", fmt),
                              ("granularity", "hour")], Limits(1_000, 10_000, 100_000), NOW)


def test_json_rows_are_exact() -> None:
    out = render(query("json"), ROWS, "next", 1.5)
    assert out.media_type == "application/json"
    doc = json.loads(out.body, parse_float=Decimal)
    assert doc["data"][0] == {"bucket": "2026-11-25T13:00:00Z", "type": "buy", "count": 3,
                              "sum_properties_amount": Decimal("0.30000000000000000001")}
    assert doc["data"][1]["count"] == 12345678901234567890 and doc["data"][1]["sum_properties_amount"] is None
    assert doc["next_cursor"] == "next"
    assert doc["meta"]["from"] == "2026-11-24T13:00:00Z" and doc["meta"]["to"] == "2026-11-25T14:00:00Z"
    assert doc["meta"]["rows"] == 2 and doc["meta"]["granularity"] == "hour"


def test_columns() -> None:
    doc = json.loads(render(query("columns"), ROWS, None, 1.0).body, parse_float=Decimal)
    assert doc["data"]["type"] == ["buy", "view, \"quoted\""]
    assert doc["data"]["sum_properties_amount"] == [Decimal("0.30000000000000000001"), None]
    assert doc["next_cursor"] is None


def test_csv() -> None:
    out = render(query("csv"), ROWS, None, 1.0)
    assert out.media_type.startswith("text/csv")
    assert out.body.decode().split("\r\n") == [
        "bucket,type,count,sum_properties_amount",
        "2026-11-25T13:00:00Z,buy,3,0.30000000000000000001",
        '2026-11-25T14:00:00Z,"view, ""quoted""",12345678901234567890,',
        "",
    ]
