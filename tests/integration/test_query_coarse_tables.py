"""Coarse tables answer exactly what the base table answers (issue 18, item 2).

One database, random stored rows in `agg_events_by_type`, its hour and day tables rebuilt
from them by the write side's `fill_coarse_tables_at`. Two query services read it: one
whose rollups file declares minute, hour and day tables (so it reads the coarsest that
serves each query), one that declares the minute table alone (so every query is forced
onto the base table and re-bucketed with date_trunc). At every granularity, in zones
whose midnights are UTC, whole hours or half hours, for grouped pages, totals and
ragged ranges, with `total=true` and as a streamed CSV export, both answer the same
bytes of data, and `meta.table` names the table each read.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.coarse import fill_coarse_tables_at
from core.migrate import migrate
from core.settings import Settings
from tests.integration.query_support import Row, exact, insert_rows, query_api

pytestmark = pytest.mark.integration

PATH = "/v1/rollups/events_by_type"
NO_CACHE = {"cache-control": "no-cache"}
ROLLUP = """
[[rollup]]
name = "events_by_type"
{granularity}
dimensions = ["type", "source"]
measures = ["count", "sum:properties.amount", "min:properties.amount", "max:properties.amount"]
"""
# 2026-03-20 to 2026-04-06: a month end, ISO weeks, Paris's and London's spring-forward (03-29).
ORIGIN = datetime(2026, 3, 20, tzinfo=UTC)
SPAN_MINUTES = 17 * 24 * 60
WHOLE = ("2026-03-01T00:00:00Z", "2026-05-01T00:00:00Z")
# Ends on no hour: an hourly page aligns them outward, totals at minute granularity read minutes.
RAGGED = ("2026-03-22T07:13:00Z", "2026-04-03T18:47:00Z")
# Ends on whole UTC days: minute totals can read the day table.
DAYS = ("2026-03-23T00:00:00Z", "2026-04-02T00:00:00Z")
ZONES = ("UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata")
GRANULARITIES = ("minute", "hour", "day", "week", "month")
FIELDS = ("bucket,type,source,count,sum_properties_amount,min_properties_amount,max_properties_amount",
          "type,count,sum_properties_amount,min_properties_amount,max_properties_amount")
BASE, HOUR, DAY = "agg_events_by_type", "agg_events_by_type__hour", "agg_events_by_type__day"


def random_rows(seed: int, n: int = 3_000) -> list[Row]:
    """Stored minute rows with unique keys; amounts present on about two thirds of them."""
    rng = random.Random(seed)
    rows: dict[tuple[Any, ...], Row] = {}
    while len(rows) < n:
        bucket = ORIGIN + timedelta(minutes=rng.randrange(SPAN_MINUTES))
        kind, source = rng.choice(["buy", "click", "view"]), rng.choice(["", "ios", "web"])
        count = rng.randint(1, 50)
        if rng.random() < 0.35:
            amounts: list[Decimal | None] = [None, None, None]
        else:
            values = [Decimal(rng.randint(-5_000, 100_000)) / 1000 for _ in range(min(count, 4))]
            amounts = [sum(values, Decimal(0)), min(values), max(values)]
        rows[(bucket, kind, source)] = {
            "bucket": bucket, "type": kind, "source": source, "count": count,
            "sum_properties_amount": amounts[0], "min_properties_amount": amounts[1],
            "max_properties_amount": amounts[2],
        }
    return list(rows.values())


@dataclass(frozen=True)
class Pair:
    coarse: httpx.AsyncClient  # declares minute, hour and day tables
    base: httpx.AsyncClient  # declares the minute table alone: every query re-buckets minutes


def _with_rollups(settings: Settings, path: Path, granularity: str, prefix: str) -> Settings:
    path.write_text(ROLLUP.format(granularity=granularity))
    return Settings(**{**settings.model_dump(), "rollups_file": path, "cache_prefix": settings.cache_prefix + prefix})


@pytest.fixture(params=[3, 18])
async def pair(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> AsyncIterator[Pair]:
    coarse = _with_rollups(settings, tmp_path / "coarse.toml", 'granularities = ["minute", "hour", "day"]', "c:")
    base = _with_rollups(settings, tmp_path / "base.toml", 'granularity = "minute"', "b:")
    assert [s.granularities for s in coarse.rollups] == [("minute", "hour", "day")]
    assert [s.granularities for s in base.rollups] == [("minute",)]
    await migrate(coarse)
    await insert_rows(coarse, random_rows(request.param))
    await fill_coarse_tables_at(str(coarse.postgres_url), coarse.rollups)
    async with query_api(coarse) as c, query_api(base) as b:
        yield Pair(c, b)


def expected_table(granularity: str, tz: str, fields: str, range_: tuple[str, str]) -> str:
    """Written out by hand from the rule, not computed by the code under test."""
    if "bucket" not in fields:  # totals: only the (aligned) range's ends matter
        if granularity in ("minute", "hour") and range_ == RAGGED:
            return BASE if granularity == "minute" else HOUR
        if tz == "Asia/Kolkata" and granularity not in ("minute", "hour"):
            return BASE
        if tz in ("Europe/Paris", "America/New_York") and granularity not in ("minute", "hour"):
            return HOUR
        return DAY
    if granularity == "minute":
        return BASE
    if granularity == "hour":
        return HOUR
    return {"UTC": DAY, "Europe/Paris": HOUR, "America/New_York": HOUR, "Asia/Kolkata": BASE}[tz]


async def both(pair: Pair, params: dict[str, str]) -> tuple[httpx.Response, httpx.Response]:
    coarse = await pair.coarse.get(PATH, params=params, headers=NO_CACHE)
    base = await pair.base.get(PATH, params=params, headers=NO_CACHE)
    assert coarse.status_code == 200, coarse.text
    assert base.status_code == 200, base.text
    return coarse, base


async def test_every_granularity_and_zone_agrees_with_the_base_table(pair: Pair) -> None:
    read: dict[str, int] = {}
    for granularity in GRANULARITIES:
        for tz in ZONES:
            for fields in FIELDS:
                for range_ in (WHOLE, RAGGED, DAYS):
                    params = {"from": range_[0], "to": range_[1], "granularity": granularity, "tz": tz,
                              "fields": fields, "limit": "10000", "total": "true"}
                    coarse, base = await both(pair, params)
                    got, want = exact(coarse), exact(base)
                    where = f"{granularity} {tz} {fields[:10]} {range_}"
                    assert got["data"] == want["data"], where
                    assert got["meta"]["total"] == want["meta"]["total"], where
                    assert got["meta"]["from"] == want["meta"]["from"] and got["meta"]["to"] == want["meta"]["to"]
                    assert got["next_cursor"] is None and len(got["data"]) > 0, where
                    assert want["meta"]["table"] == BASE and want["meta"]["table_granularity"] == "minute"
                    table = got["meta"]["table"]
                    assert table == expected_table(granularity, tz, fields, range_), where
                    assert got["meta"]["table_granularity"] == {BASE: "minute", HOUR: "hour", DAY: "day"}[table]
                    # Fewer stored rows merged whenever a coarser table answered.
                    if table != BASE:
                        assert got["meta"]["rows_read"] < want["meta"]["rows_read"], where
                    read[table] = read.get(table, 0) + 1
    assert set(read) == {BASE, HOUR, DAY}


async def test_pages_filters_and_exports_agree(pair: Pair) -> None:
    """A cursor walk over filtered, ordered pages, and a streamed CSV export with its total."""
    for granularity, tz in (("hour", "UTC"), ("day", "Europe/Paris"), ("week", "UTC"), ("day", "Asia/Kolkata")):
        params = {"from": WHOLE[0], "to": WHOLE[1], "granularity": granularity, "tz": tz,
                  "fields": "bucket,type,count,max_properties_amount", "filter[source]": "ios,",
                  "filter[count]": "gte:20", "order": "-max_properties_amount,bucket", "limit": "7"}
        pages: dict[str, list[Any]] = {"coarse": [], "base": []}
        cursors: dict[str, str | None] = {"coarse": None, "base": None}
        for _ in range(2_000):
            for side, http in (("coarse", pair.coarse), ("base", pair.base)):
                cursor = cursors[side]
                response = await http.get(PATH, params={**params, **({"cursor": cursor} if cursor else {})},
                                          headers=NO_CACHE)
                assert response.status_code == 200, response.text
                page = exact(response)
                pages[side].extend(page["data"])
                cursors[side] = page["next_cursor"]
            if cursors["coarse"] is None or cursors["base"] is None:
                break
        assert cursors == {"coarse": None, "base": None}
        assert pages["coarse"] == pages["base"] and len(pages["coarse"]) > 7
        export = {**params, "limit": "50000", "format": "csv", "total": "true"}
        export.pop("order")
        coarse, base = await both(pair, export)
        assert coarse.headers["x-cache"] == "stream"
        assert coarse.content == base.content and coarse.content.count(b"\r\n") > 7
        assert coarse.headers["x-total-count"] == base.headers["x-total-count"]


async def test_the_catalog_lists_the_stored_tables(pair: Pair) -> None:
    listed = (await pair.coarse.get("/v1/rollups")).json()["data"][0]
    assert listed["stored_granularities"] == ["minute", "hour", "day"]
    assert listed["tables"] == {"minute": BASE, "hour": HOUR, "day": DAY}
    only = (await pair.base.get("/v1/rollups")).json()["data"][0]
    assert only["stored_granularities"] == ["minute"] and only["tables"] == {"minute": BASE}
