"""SQL injection through EVERY query parameter of every query route, enumerated from the query
app's own OpenAPI spec, so a parameter added later is attacked without anyone editing this file.

tests/integration/test_query_robustness.py attacks a hand-written list (it misses `tz` and
`total`, and dimension filter values only by a few cases); this one derives the list, checks it
equals what `query.params` validates, and asserts for each (route, parameter, payload): no 5xx,
errors are problem+json naming the parameter, no `pg_sleep` ran, and in the end every table and
row of the database is exactly as before.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from core.settings import Settings
from query.app import create_app
from query.params import PARAMETERS
from tests.conftest import serving
from tests.hostile.support import assert_problem
from tests.integration.query_support import ALL_FIELDS, SKETCH_DEFAULTS, WHOLE, exact, insert_rows, make_rows, wire

pytestmark = pytest.mark.integration

TABLE = "agg_events_by_type"
PAYLOADS = (
    "count; DROP TABLE agg_events_by_type",
    "bucket) OR (1=1",
    "type' --",
    "1; SELECT pg_sleep(5)",
    "' OR '1'='1",
    "x'); DROP TABLE tally_offsets; --",
    "1 UNION SELECT tablename FROM pg_tables",
    "$1",
    "%' OR 1=1 --",
    "\\'; SELECT pg_sleep(5); --",
    "\x00'; DROP TABLE tally_meta; --",
    "é' OR 'é'='é",
    '"; DROP TABLE "agg_page_views',
)
EVIL = "x'; DROP TABLE agg_events_by_type; --"
SLOW = 2.5  # seconds: far less than any pg_sleep(5), with room for a loaded machine


def query_parameters(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """(path template, parameter) -> its OpenAPI object, for every parameter of every GET route."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method != "get":
                continue
            for parameter in operation.get("parameters", []):
                out[(path, parameter["name"])] = parameter
    return out


def attacks(path: str, parameter: dict[str, Any], payload: str) -> list[tuple[str, dict[str, str], tuple[str, ...]]]:
    """(url path, query, what a 400 must name: one of these) for one parameter carrying `payload`."""
    name = parameter["name"]
    concrete = path.replace("{name}", "events_by_type")
    if parameter["in"] == "path":
        return [(path.replace("{" + name + "}", quote(payload, safe="")), {**WHOLE}, ())]
    if parameter["in"] != "query":
        raise AssertionError(f"a {parameter['in']} parameter {name!r}: teach this test to attack it")
    if parameter.get("style") == "deepObject":  # filter[<column>]=value: the column, and the values
        return [
            (concrete, {**WHOLE, f"{name}[{payload}]": "buy"}, (payload,)),
            (concrete, {**WHOLE, f"{name}[count]": payload}, (f"{name}[count]",)),
            (concrete, {**WHOLE, f"{name}[type]": payload}, ()),  # a dimension value is data: a 200
            (concrete, {**WHOLE, f"{name}[source]": payload, f"{name}[type]": "buy"}, ()),
        ]
    # The 400 names the parameter, or quotes the offending value (an unknown column in `fields`).
    return [(concrete, {**WHOLE, name: payload}, () if parameter.get("undeclared") else (name, payload))]


async def snapshot(settings: Settings) -> tuple[set[str], list[tuple[Any, ...]]]:
    conn = await asyncpg.connect(str(settings.postgres_url))
    try:
        names = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
        rows = await conn.fetch(f"SELECT {', '.join(ALL_FIELDS)} FROM {TABLE}")
    finally:
        await conn.close()
    return {r["tablename"] for r in names}, sorted(tuple(r[c] for c in ALL_FIELDS) for r in rows)


async def test_sql_in_every_query_parameter_is_refused_or_data(migrated: Settings) -> None:
    settings = migrated
    evil = {
        "bucket": datetime(2026, 3, 28, 20, 0, tzinfo=UTC),
        "type": EVIL,
        "source": "web",
        "count": 3,
        "sum_properties_amount": Decimal("1.5"),
        "min_properties_amount": Decimal("0.5"),
        "max_properties_amount": Decimal("1"),
    }
    # Consumers store NUL as U+FFFD (Postgres text cannot hold NUL); a filter asks for it as sent.
    nul = {**evil, "type": "nul", "source": "a\ufffdb"}
    rows = [*make_rows(), evil, nul]
    await insert_rows(settings, rows)
    before = await snapshot(settings)
    assert {TABLE, "agg_page_views", "tally_offsets", "tally_meta"} <= before[0]

    failures: list[tuple[str, dict[str, str], Any]] = []
    async with serving(create_app(settings)) as (url, _), httpx.AsyncClient(base_url=url, timeout=30) as http:
        spec = (await http.get("/openapi.json")).json()
        parameters = query_parameters(spec)
        rollup_params = {name for path, name in parameters if path == "/v1/rollups/{name}"} - {"name"}
        # The spec documents exactly what query.params validates (filter[<column>] is `filter`).
        assert rollup_params == {p.split("[")[0] for p in PARAMETERS}, rollup_params
        assert {"tz", "total", "filter", "cursor"} <= rollup_params

        targets = [(path, parameter) for (path, _), parameter in sorted(parameters.items())]
        # An undeclared parameter, too: the rollup route refuses it by name.
        targets.append(("/v1/rollups/{name}", {"name": "x", "in": "query", "undeclared": True}))
        for path, parameter in targets:
            for payload in PAYLOADS:
                for where, query, named in attacks(path, parameter, payload):
                    await attack(http, where, query, named, failures)
        # Routes without parameters ignore the query string: every payload at once, one request each
        # (the lag route asks Kafka, about a second a call on the embedded broker).
        for path, operations in spec["paths"].items():
            if "get" in operations and "{" not in path:
                query = {f"x{i}": payload for i, payload in enumerate(PAYLOADS)}
                await attack(http, path, query, (), failures)

        found = await http.get("/v1/rollups/events_by_type", params={**WHOLE, "filter[type]": EVIL})
        with_nul = await http.get("/v1/rollups/events_by_type", params={**WHOLE, "filter[source]": "a\x00b"})
        totals = await http.get("/v1/rollups/events_by_type", params={**WHOLE, "fields": "count"})
    assert failures == [], "\n".join(map(str, failures))
    assert found.status_code == 200, found.text
    assert exact(found)["data"] == wire([{**evil, **SKETCH_DEFAULTS}])  # the payload is a value that can be found
    assert with_nul.status_code == 200, with_nul.text
    assert exact(with_nul)["data"] == wire([{**nul, **SKETCH_DEFAULTS}])
    assert exact(totals)["data"] == [{"count": sum(r["count"] for r in rows)}]
    assert await snapshot(settings) == before


async def attack(
    http: httpx.AsyncClient,
    where: str,
    query: dict[str, str],
    named: tuple[str, ...],
    failures: list[tuple[str, dict[str, str], Any]],
) -> None:
    started = time.monotonic()
    response = await http.get(where, params=query)
    verdict = judge(response, named, time.monotonic() - started)
    if verdict:
        failures.append((where, query, verdict))


def judge(response: httpx.Response, named: tuple[str, ...], took: float) -> str | None:
    """What is wrong with one answer to an attack, or None."""
    if took > SLOW:
        return f"took {took:.2f} s: did SQL run?"
    status, content_type = response.status_code, response.headers.get("content-type", "")
    if status >= 500:
        return f"{status}: {response.text[:300]}"
    if status >= 400:
        try:
            problem = assert_problem(status, content_type, response.content)
        except AssertionError as exc:
            return f"not a problem: {exc}"
        detail = problem.get("detail", "")
        if named and (status != 400 or not any(n[:40] in detail or repr(n)[1:41] in detail for n in named)):
            return f"{status} does not name {named!r}: {problem}"
        return None
    if named:
        return f"{status} for a parameter that must be refused: {response.text[:300]}"
    if status == 200 and "/v1/rollups/" in str(response.url.path) and exact(response)["data"] != []:
        return f"an injected filter value matched rows: {response.text[:300]}"
    return None
