"""Property: for random rollup contents and random queries, the API's answer is exactly the
answer computed in Python from the same stored rows, at every granularity and in several zones.

Hypothesis drives a synchronous test; the query app, its HTTP client and a Postgres
connection live on an event loop in a second thread, so one server serves every example.
Every request sends `Cache-Control: no-cache`: each example rewrites the table, and a
cached answer from a previous example would be right for the wrong data.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, time, timedelta, tzinfo
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.settings import Settings
from query.app import create_app
from tests.conftest import serve
from tests.integration.query_support import ALL_FIELDS, DIMS, MEASURES, OP, Row, exact, fill_coarse, sort_rows

pytestmark = pytest.mark.integration

T = TypeVar("T")
PATH = "/v1/rollups/events_by_type"
# Crosses a month end, ISO weeks, and Paris's spring-forward night (2026-03-29).
ORIGIN = datetime(2026, 3, 20, tzinfo=UTC)
SPAN_MINUTES = 16 * 24 * 60
RANGE = {"from": "2026-03-01T00:00:00Z", "to": "2026-05-01T00:00:00Z"}
ZONES = ("UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata")
GRANULARITIES = ("minute", "hour", "day", "week", "month")
NO_CACHE = {"cache-control": "no-cache"}


class ThreadApi:
    """The query API under uvicorn plus a client and a Postgres connection, on their own loop."""

    def __init__(self, settings: Settings) -> None:
        self._settings = self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),), daemon=True)
        self.http: httpx.AsyncClient
        self.pg: asyncpg.Connection

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serve(create_app(self._settings)) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
            self.http, self.pg = http, await asyncpg.connect(str(self._settings.postgres_url))
            try:
                self._ready.set()
                await self._stop.wait()
            finally:
                await self.pg.close()

    def __enter__(self) -> ThreadApi:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the query API did not start")
        return self

    def __exit__(self, *_: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self._loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=120)


@pytest.fixture
def api(migrated: Settings) -> Iterator[ThreadApi]:
    with ThreadApi(migrated) as running:
        yield running


# --- strategies -------------------------------------------------------------------------------

amounts = st.decimals(min_value=-1000, max_value=1000, places=3, allow_nan=False, allow_infinity=False)


@st.composite
def stored_rows(draw: st.DrawFn) -> list[Row]:
    keys = draw(st.lists(st.tuples(st.integers(0, SPAN_MINUTES), st.sampled_from(["", "a", "b", "c"]),
                                   st.sampled_from(["x", "y"])), max_size=60, unique=True))
    rows = []
    for minute, kind, source in keys:
        present = draw(st.booleans())
        rows.append({"bucket": ORIGIN + timedelta(minutes=minute), "type": kind, "source": source,
                     "count": draw(st.integers(1, 1_000)),
                     **{m: draw(amounts) if present else None for m in MEASURES if m != "count"}})
    return rows


@st.composite
def queries(draw: st.DrawFn) -> dict[str, Any]:
    fields = draw(st.permutations(ALL_FIELDS).map(list).flatmap(lambda p: st.integers(1, len(p)).map(lambda n: p[:n])))
    ordered = draw(st.lists(st.sampled_from(fields), unique=True, max_size=3))
    return {
        "granularity": draw(st.sampled_from(GRANULARITIES)),
        "tz": draw(st.sampled_from(ZONES)),
        "fields": fields,
        "order": [("-" if draw(st.booleans()) else "") + f for f in ordered],
        "types": draw(st.none() | st.lists(st.sampled_from(["", "a", "b", "c"]), min_size=1, max_size=3, unique=True)),
        "min_count": draw(st.none() | st.integers(1, 1_500)),
        "limit": draw(st.integers(1, 25)),
        "format": draw(st.sampled_from(["json", "columns"])),
    }


# --- the oracle ---------------------------------------------------------------------------------


def bucket_of(dt: datetime, granularity: str, zone: tzinfo) -> datetime:
    """Independent of the code under test: local calendar arithmetic, then that date's midnight.
    (The zones used change clocks at 02:00 or later, so every local midnight exists once.)"""
    if granularity == "minute":
        return dt.replace(second=0, microsecond=0)
    if granularity == "hour":
        return dt.replace(minute=0, second=0, microsecond=0)
    day = dt.astimezone(zone).date()
    if granularity == "week":
        day -= timedelta(days=day.weekday())
    elif granularity == "month":
        day = day.replace(day=1)
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def spell(dt: datetime, zone_name: str) -> str:
    if zone_name == "UTC":
        return dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    return dt.astimezone(ZoneInfo(zone_name)).isoformat()


def stored_at(rows: list[Row], granularity: str) -> list[Row]:
    """The rows of the table kept at `granularity` (UTC buckets): `rows` re-bucketed, as the consumer keeps it."""
    if granularity == "minute":
        return rows
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for r in rows:
        groups.setdefault((bucket_of(r["bucket"], granularity, UTC), r["type"], r["source"]), []).append(r)
    out = []
    for (bucket, kind, source), members in groups.items():
        row: Row = {"bucket": bucket, "type": kind, "source": source}
        for m in MEASURES:
            present = [x[m] for x in members if x[m] is not None]
            row[m] = None if not present else sum(present) if OP[m] == "sum" else min(present) if OP[m] == "min" \
                else max(present)
        out.append(row)
    return out


def answer(rows: list[Row], q: dict[str, Any]) -> tuple[list[Row], int]:
    """The rows the query must return, in order, and how many stored rows they merge."""
    zone = ZoneInfo(q["tz"])
    # The group key, which also breaks ties in the order: bucket first, then dimensions as listed.
    keys = [*(["bucket"] if "bucket" in q["fields"] else []), *(f for f in q["fields"] if f in DIMS)]
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for r in rows:
        if q["types"] is not None and r["type"] not in q["types"]:
            continue
        key = tuple(bucket_of(r["bucket"], q["granularity"], zone) if f == "bucket" else r[f] for f in keys)
        groups.setdefault(key, []).append(r)
    out, merged = [], 0
    for key, members in groups.items():
        row: Row = dict(zip(keys, key, strict=True))
        for m in MEASURES:
            present = [x[m] for x in members if x[m] is not None]
            row[m] = None if not present else sum(present) if OP[m] == "sum" else min(present) if OP[m] == "min" \
                else max(present)
        if q["min_count"] is not None and row["count"] < q["min_count"]:
            continue
        merged += len(members)
        out.append(row)
    explicit = [o.lstrip("-") for o in q["order"]]
    order = [*q["order"], *(k for k in keys if k not in explicit)]
    ordered = sort_rows(out, order)
    return [{f: spell(r[f], q["tz"]) if f == "bucket" else r[f] for f in q["fields"]} for r in ordered], merged


# --- the property ------------------------------------------------------------------------------


async def replace_rows(api: ThreadApi, rows: list[Row]) -> None:
    await api.pg.execute("TRUNCATE agg_events_by_type")
    await api.pg.executemany(
        "INSERT INTO agg_events_by_type (bucket, type, source, count, sum_properties_amount,"
        " min_properties_amount, max_properties_amount) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        [tuple(r[c] for c in ALL_FIELDS) for r in rows])
    await fill_coarse(api.pg, api.settings, "events_by_type")  # the hour and day tables the planner reads


async def walk_all(api: ThreadApi, q: dict[str, Any]) -> tuple[list[Row], list[dict[str, Any]]]:
    params = {**RANGE, "granularity": q["granularity"], "tz": q["tz"], "fields": ",".join(q["fields"]),
              "limit": str(q["limit"]), "format": q["format"], "total": "true"}
    if q["order"]:
        params["order"] = ",".join(q["order"])
    if q["types"] is not None:
        params["filter[type]"] = ",".join(q["types"])
    if q["min_count"] is not None:
        params["filter[count]"] = f"gte:{q['min_count']}"
    rows: list[Row] = []
    metas: list[dict[str, Any]] = []
    cursor = None
    for _ in range(500):
        response = await api.http.get(PATH, params={**params, **({"cursor": cursor} if cursor else {})},
                                      headers=NO_CACHE)
        assert response.status_code == 200, response.text
        page = exact(response)
        data = page["data"]
        if q["format"] == "columns":
            data = [dict(zip(q["fields"], values, strict=True)) for values in zip(*data.values(), strict=True)] \
                if data[q["fields"][0]] else []
        rows.extend(data)
        metas.append(page["meta"])
        cursor = page["next_cursor"]
        if cursor is None:
            return rows, metas
    raise AssertionError("the cursor walk did not end")


# The app under test runs in a thread of this process, and its background work (the lag
# sampler's Kafka client, retry jitter) uses the global `random` while Hypothesis draws
# examples; Hypothesis reports any such use as a strategy's, which none of ours is.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                HealthCheck.too_slow])
@given(rows=stored_rows(), q=queries())
def test_answers_equal_python_over_the_same_rows(api: ThreadApi, rows: list[Row], q: dict[str, Any]) -> None:
    api.run(replace_rows(api, rows))
    got, metas = api.run(walk_all(api, q))
    want, _ = answer(rows, q)
    assert got == want
    assert {m["total"] for m in metas} == {len(want)}
    # rows_read counts the rows of the table the planner read (meta.table_granularity): the base
    # table's, or a coarse table's (the base rows re-bucketed, as the consumer keeps it).
    (read_at,) = {m["table_granularity"] for m in metas}
    _, merged = answer(stored_at(rows, read_at), q)
    assert sum(m["rows_read"] for m in metas) == merged
    assert len(metas) == max(1, -(-len(want) // q["limit"]))  # full pages, then the rest; no empty last page
