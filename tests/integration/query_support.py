"""Shared by the query integration tests: known rollup rows, an independent oracle, the app under uvicorn."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cmp_to_key
from typing import Any, cast

import asyncpg
import httpx
from fastapi import FastAPI
from prometheus_client import REGISTRY

from core.coarse import fill_statements
from core.settings import Settings
from query.app import create_app
from query.state import QueryState
from tests.conftest import serve

DIMS = ("type", "source")
MEASURES = ("count", "sum_properties_amount", "min_properties_amount", "max_properties_amount")
ALL_FIELDS = ("bucket", *DIMS, *MEASURES)  # the stored columns these tests write (sketches: NULL)
# The shipped rollup's sketch fields a query returns by default, as they read over rows without sketches.
SKETCH_DEFAULTS: dict[str, Any] = {
    "uniq_user_id": 0, "p50_properties_amount": None, "p95_properties_amount": None, "p99_properties_amount": None,
}
DEFAULT_FIELDS = (*ALL_FIELDS, *SKETCH_DEFAULTS)  # what a query without `fields` returns
OP = {"count": "sum", "sum_properties_amount": "sum", "min_properties_amount": "min", "max_properties_amount": "max"}
# Saturday 2026-03-28 20:00 to Thursday 2026-04-02: crosses a day, an ISO week (Monday 03-30) and a month.
FIRST = datetime(2026, 3, 28, 20, 0, tzinfo=UTC)
WHOLE = {"from": "2026-03-01T00:00:00Z", "to": "2026-05-01T00:00:00Z"}

Row = dict[str, Any]


def make_rows(seed: int = 11, n: int = 240) -> list[Row]:
    """Stored rows of agg_events_by_type: unique keys, NULL amounts for views and some others."""
    rng = random.Random(seed)
    rows: dict[tuple[Any, ...], Row] = {}
    while len(rows) < n:
        bucket = FIRST + timedelta(minutes=rng.randrange(0, 4 * 24 * 60 + 600))
        kind, source = rng.choice(["buy", "click", "view"]), rng.choice(["", "ios", "web"])
        count = rng.randint(1, 40)
        if kind == "view" or rng.random() < 0.25:
            amounts: list[Decimal | None] = [None, None, None]
        else:
            values = [Decimal(rng.randint(-500, 100_000)) / 1000 for _ in range(count)]
            amounts = [sum(values, Decimal(0)), min(values), max(values)]
        rows[(bucket, kind, source)] = {"bucket": bucket, "type": kind, "source": source, "count": count,
                                        "sum_properties_amount": amounts[0], "min_properties_amount": amounts[1],
                                        "max_properties_amount": amounts[2]}
    return list(rows.values())


async def insert_rows(settings: Settings, rows: Iterable[Row]) -> None:
    """Store `rows` in agg_events_by_type, then rebuild its coarse tables (if the rollups file declares
    any) from it, as `tally migrate` would: the planner reads those for hour and day queries."""
    conn = await asyncpg.connect(str(settings.postgres_url))
    try:
        await conn.executemany(
            "INSERT INTO agg_events_by_type (bucket, type, source, count, sum_properties_amount,"
            " min_properties_amount, max_properties_amount) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [tuple(r[c] for c in ALL_FIELDS) for r in rows],
        )
        await fill_coarse(conn, settings, "events_by_type")
    finally:
        await conn.close()


async def fill_coarse(conn: asyncpg.Connection, settings: Settings, rollup: str) -> None:
    """Rebuild `rollup`'s coarse tables from its base table (core.coarse), for tests that seed the base table."""
    for spec in settings.rollups:
        if spec.name == rollup:
            async with conn.transaction():
                for statement in fill_statements(spec):
                    await conn.execute(statement)


def trunc(dt: datetime, granularity: str) -> datetime:
    """An independent re-bucketing oracle (UTC; ISO weeks from Monday; calendar months)."""
    if granularity == "minute":
        return dt.replace(second=0, microsecond=0)
    if granularity == "hour":
        return dt.replace(minute=0, second=0, microsecond=0)
    day = dt.replace(hour=0, minute=0, second=0, microsecond=0)
    if granularity == "day":
        return day
    if granularity == "week":
        return day - timedelta(days=day.weekday())
    return day.replace(day=1)


def _merge(values: list[Any], op: str) -> Any:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return sum(present) if op == "sum" else min(present) if op == "min" else max(present)


def expected(rows: Iterable[Row], granularity: str, fields: Sequence[str], start: datetime, end: datetime,
             filters: Mapping[str, Sequence[str]] | None = None) -> list[Row]:
    groups: dict[tuple[Any, ...], list[Row]] = {}
    keys = [f for f in fields if f == "bucket" or f in DIMS]
    for r in rows:
        if not start <= r["bucket"] < end:
            continue
        if filters and any(r[d] not in v for d, v in filters.items()):
            continue
        key = tuple(trunc(r["bucket"], granularity) if f == "bucket" else r[f] for f in keys)
        groups.setdefault(key, []).append(r)
    out = []
    for key, members in groups.items():
        row = dict(zip(keys, key, strict=True))
        for m in (f for f in fields if f in MEASURES):
            row[m] = _merge([x[m] for x in members], OP[m])
        row.update({m: SKETCH_DEFAULTS[m] for m in fields if m in SKETCH_DEFAULTS})
        out.append({f: row[f] for f in fields})
    return out


def sort_rows(rows: list[Row], order: Sequence[str]) -> list[Row]:
    """Sort by `-col,col` specs, NULLs last in both directions (the API's contract)."""
    def cmp(a: Row, b: Row) -> int:
        for spec in order:
            col, desc = spec.lstrip("-"), spec.startswith("-")
            x, y = a[col], b[col]
            if x == y:
                continue
            if x is None:
                return 1
            if y is None:
                return -1
            c = -1 if x < y else 1
            return -c if desc else c
        return 0
    return sorted(rows, key=cmp_to_key(cmp))


def wire(rows: list[Row]) -> list[Row]:
    """Expected rows as the API spells them (buckets as RFC 3339 with Z)."""
    return [{k: f"{v:%Y-%m-%dT%H:%M:%SZ}" if isinstance(v, datetime) else v for k, v in r.items()} for r in rows]


def exact(response: httpx.Response) -> Any:
    return json.loads(response.content, parse_float=Decimal)


def stored(response: httpx.Response) -> bytes:
    """The JSON body as the cache stores it: without the per-response meta spliced onto its end."""
    cut = response.content.rindex(b',"query_ms":')
    return response.content[:cut] + b"}}"


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def query_api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(create_app(settings)) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        yield http


async def walk(http: httpx.AsyncClient, path: str, params: dict[str, str]) -> tuple[list[Row], int]:
    """Every page through next_cursor: (rows, pages)."""
    rows: list[Row] = []
    cursor: str | None = None
    for pages in range(1, 10_000):
        response = await http.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        page = exact(response)
        assert len(page["data"]) <= int(params.get("limit", 1000))
        rows.extend(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            return rows, pages
    raise AssertionError("pagination did not end")


def capture_state(app: FastAPI) -> list[QueryState]:
    """Wrap the app's lifespan so the test can reach the state it creates (the read engine)."""
    held: list[QueryState] = []
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as st:
            held.append(cast(QueryState, st))
            yield st

    app.router.lifespan_context = lifespan
    return held


@contextlib.asynccontextmanager
async def running(settings: Settings, **client: Any) -> AsyncIterator[tuple[httpx.AsyncClient, QueryState]]:
    app = create_app(settings)
    held = capture_state(app)
    async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30, **client) as http:
        assert len(held) == 1  # uvicorn reports `started` after the lifespan's startup
        yield http, held[0]
