"""The query API under pressure, on real Postgres and Redis: a stampede on a cold key, Redis
killed and restored mid-test, SQL in every parameter, and cursor walks while rows are inserted."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import event

from core import devstack
from core.settings import Settings
from tests.integration.query_support import (
    ALL_FIELDS,
    DEFAULT_FIELDS,
    FIRST,
    SKETCH_DEFAULTS,
    WHOLE,
    Row,
    exact,
    expected,
    insert_rows,
    make_rows,
    running,
    sample,
    sort_rows,
    wire,
)

pytestmark = pytest.mark.integration

PATH = "/v1/rollups/events_by_type"
START, END = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 5, 1, tzinfo=UTC)
TABLE = "agg_events_by_type"
INSERT = (
    f"INSERT INTO {TABLE} (bucket, type, source, count, sum_properties_amount, min_properties_amount,"
    " max_properties_amount) VALUES ($1, $2, $3, $4, $5, $6, $7)"
)
# A row with a new group key, into the base table and its coarse tables (its bucket floored to
# each), in one transaction: what a consumer's commit of it does (consumers.flush).
COARSE_INSERTS = [INSERT] + [
    f"INSERT INTO {TABLE}__{g} (bucket, type, source, count, sum_properties_amount, min_properties_amount,"
    f" max_properties_amount) VALUES (date_trunc('{g}', $1::timestamptz, 'UTC'), $2, $3, $4, $5, $6, $7)"
    for g in ("hour", "day")
]
HOURLY_FIELDS = ["bucket", "type", "count", "sum_properties_amount"]
HOURLY = {**WHOLE, "granularity": "hour", "fields": ",".join(HOURLY_FIELDS)}


def computations() -> float:
    """Rollup queries run against Postgres for events_by_type, whatever the reason."""
    return sum(
        sample("tally_query_computations_total", {"rollup": "events_by_type", "reason": reason})
        for reason in ("miss", "refresh", "bypass")
    )


def outcomes() -> dict[str, float]:
    return {
        o: sample("tally_query_cache_total", {"outcome": o}) for o in ("hit", "stale", "miss", "coalesced", "bypass")
    }


async def db_rows(settings: Settings) -> list[Row]:
    conn = await asyncpg.connect(str(settings.postgres_url))
    try:
        records = await conn.fetch(f"SELECT {', '.join(ALL_FIELDS)} FROM {TABLE}")
    finally:
        await conn.close()
    return [dict(r) for r in records]


async def tables(settings: Settings) -> set[str]:
    conn = await asyncpg.connect(str(settings.postgres_url))
    try:
        records = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    finally:
        await conn.close()
    return {r["tablename"] for r in records}


def canonical(rows: list[Row]) -> list[tuple[Any, ...]]:
    return sorted(tuple(r[c] for c in ALL_FIELDS) for r in rows)


# -- 1. Stampede ------------------------------------------------------------------------------------


async def test_stampede_on_a_cold_key_sends_one_query_to_postgres(loaded: tuple[Settings, list[Row]]) -> None:
    settings, rows = loaded
    want = wire(sort_rows(expected(rows, "hour", HOURLY_FIELDS, START, END), ["bucket", "type"]))
    sent: list[str] = []

    def on_execute(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        if TABLE in statement:
            sent.append(statement)

    before_runs, before = computations(), outcomes()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with running(settings, limits=limits) as (http, st):
        engine = st["engine"].sync_engine
        event.listen(engine, "before_cursor_execute", on_execute)
        try:
            responses = await asyncio.gather(*(http.get(PATH, params=HOURLY) for _ in range(200)))
            after = outcomes()
            then = await http.get(PATH, params=HOURLY)
        finally:
            event.remove(engine, "before_cursor_execute", on_execute)
    delta = {o: after[o] - before[o] for o in after if after[o] != before[o]}
    x_cache = Counter(r.headers["x-cache"] for r in responses)
    seen = {
        "postgres_statements": len(sent),
        "computations": computations() - before_runs,
        "x_cache": dict(x_cache),
        "outcomes": delta,
        "next": then.headers["x-cache"],
    }
    assert [r.status_code for r in responses] == [200] * 200
    assert all(exact(r)["data"] == want for r in responses)
    assert {exact(r)["next_cursor"] for r in responses} == {None}
    assert len(sent) == 1, seen  # what actually went to Postgres
    assert computations() - before_runs == 1, seen
    # One computer, everyone else waited for it or read what it stored; nothing bypassed the cache.
    assert set(x_cache) <= {"miss", "hit"}, seen
    assert delta.get("miss") == 1 and delta.get("bypass", 0) == delta.get("stale", 0) == 0, seen
    assert delta["miss"] + delta.get("coalesced", 0) + delta.get("hit", 0) == 200, seen
    assert delta.get("coalesced", 0) >= 1, seen  # the requests did overlap: some waited for the computer
    # The stampede left the answer cached.
    assert then.headers["x-cache"] == "hit" and exact(then)["data"] == want, seen


# -- 2. Redis killed and restored -------------------------------------------------------------------


async def test_redis_killed_then_restored(loaded: tuple[Settings, list[Row]]) -> None:
    settings, rows = loaded
    want = wire(sort_rows(expected(rows, "hour", HOURLY_FIELDS, START, END), ["bucket", "type"]))
    daily_fields = ["bucket", "source", "count"]
    daily = {**WHOLE, "granularity": "day", "fields": ",".join(daily_fields)}
    want_daily = wire(sort_rows(expected(rows, "day", daily_fields, START, END), ["bucket", "source"]))
    port = devstack.free_port()
    redis = devstack.redis(port).start()
    try:
        # The Redis tier's own fallback: the in-process tier, which would keep serving these closed
        # ranges from memory (tests/integration/test_query_local_cache.py), is off here.
        private = settings.model_copy(update={"redis_url": redis.url, "query_local_cache_mb": 0})
        async with running(private) as (http, _):
            first = await http.get(PATH, params=HOURLY)
            second = await http.get(PATH, params=HOURLY)
            assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
            assert exact(first)["data"] == exact(second)["data"] == want

            redis.kill()
            bypasses_before = sample("tally_query_cache_total", {"outcome": "bypass"})
            bypassed = 0
            timings: list[float] = []
            for params, expect in [(HOURLY, want), (daily, want_daily)] * 3:
                started = time.monotonic()
                response = await http.get(PATH, params=params)
                timings.append(time.monotonic() - started)
                assert response.status_code == 200, response.text
                assert response.headers["x-cache"] == "bypass"
                assert exact(response)["data"] == expect
                bypassed += 1
            burst = await asyncio.gather(*(http.get(PATH, params=HOURLY) for _ in range(10)))
            assert [(r.status_code, r.headers["x-cache"]) for r in burst] == [(200, "bypass")] * 10
            assert all(exact(r)["data"] == want for r in burst)
            bypassed += len(burst)
            # The first request pays one bounded Redis timeout; the breaker spares the others.
            assert timings[0] < 2.0, timings
            assert max(timings[1:]) < 0.5, timings
            assert sample("tally_query_cache_total", {"outcome": "bypass"}) - bypasses_before == bypassed

            redis.start()  # the same port
            restarted = time.monotonic()
            seen: list[str] = []
            while True:
                response = await http.get(PATH, params=HOURLY)
                assert response.status_code == 200
                assert exact(response)["data"] == want
                seen.append(response.headers["x-cache"])
                if seen[-1] != "bypass":
                    break
                assert time.monotonic() - restarted < 8, seen
                await asyncio.sleep(0.1)
            resumed = time.monotonic() - restarted
            again = await http.get(PATH, params=HOURLY)
        assert seen[-1] == "miss", seen  # the restarted Redis is empty
        assert again.headers["x-cache"] == "hit" and exact(again)["data"] == want
        assert resumed < 5, resumed  # the breaker is ~2 s, plus at most one Redis timeout
    finally:
        redis.kill()


# -- 3. SQL injection -------------------------------------------------------------------------------

PAYLOADS = (
    "count; DROP TABLE agg_events_by_type",
    "bucket) OR (1=1",
    "type' --",
    "1; SELECT pg_sleep(5)",
    "type;DROP TABLE x",
)
EVIL = "x'; DROP TABLE agg_events_by_type; --"


def injected(param: str, payload: str) -> tuple[dict[str, str], str]:
    """Query parameters carrying `payload` in `param`, and what the 400's detail must name."""
    if param == "filter":
        return {**WHOLE, f"filter[{payload}]": "buy"}, payload
    if param in ("fields", "order"):
        return {**WHOLE, param: payload}, payload  # a column name: the detail quotes it
    if param == "offset":
        return {**WHOLE, "offset": payload}, "offset"
    return {**WHOLE, param: payload}, param


async def test_sql_in_parameters_is_refused_and_filter_values_are_data(migrated: Settings) -> None:
    settings = migrated
    evil = {
        "bucket": FIRST,
        "type": EVIL,
        "source": "web",
        "count": 3,
        "sum_properties_amount": Decimal("1.5"),
        "min_properties_amount": Decimal("0.5"),
        "max_properties_amount": Decimal("1"),
    }
    rows = [*make_rows(), evil]
    await insert_rows(settings, rows)
    tables_before = await tables(settings)
    assert {TABLE, "agg_page_views", "tally_offsets", "tally_rollups", "tally_meta"} <= tables_before

    params = ("fields", "order", "filter", "granularity", "format", "from", "to", "limit", "offset", "cursor")
    failures: list[tuple[str, str, Any]] = []
    async with running(settings) as (http, _):
        for param in params:
            for payload in PAYLOADS:
                query, named = injected(param, payload)
                started = time.monotonic()
                response = await http.get(PATH, params=query)
                elapsed = time.monotonic() - started
                body = response.json() if response.headers.get("content-type") == "application/problem+json" else None
                if not (
                    response.status_code == 400
                    and body is not None
                    and named in body.get("detail", "")
                    and elapsed < 1.0
                ):
                    failures.append((param, payload, (response.status_code, response.text[:300], elapsed)))
        wrong_rollup = await http.get(f"{PATH};DROP TABLE {TABLE}")

        started = time.monotonic()
        found = await http.get(PATH, params={**WHOLE, "filter[type]": EVIL})
        tautology = await http.get(PATH, params={**WHOLE, "filter[type]": "' OR '1'='1"})
        sleepy = await http.get(
            PATH,
            params={
                **WHOLE,
                "filter[type]": "1; SELECT pg_sleep(5)",
                "filter[source]": "web'); DROP TABLE tally_offsets; --",
            },
        )
        as_data = time.monotonic() - started
        everything = await http.get(PATH, params={**WHOLE, "fields": "count"})
    assert failures == []
    assert wrong_rollup.status_code == 404
    assert wrong_rollup.headers["content-type"] == "application/problem+json"

    assert found.status_code == 200, found.text
    assert exact(found)["data"] == wire([{**evil, **SKETCH_DEFAULTS}])
    for response in (tautology, sleepy):
        assert response.status_code == 200, response.text
        assert exact(response)["data"] == []
    assert as_data < 1.5, as_data  # pg_sleep was never run
    assert exact(everything)["data"] == [{"count": sum(r["count"] for r in rows)}]

    assert canonical(await db_rows(settings)) == canonical(rows)
    assert await tables(settings) == tables_before


# -- 4. Cursor walks while rows are inserted --------------------------------------------------------


class Inserter:
    """Inserts rows with fresh group keys (a `type` never used before) until stopped."""

    def __init__(self, settings: Settings, seed: int) -> None:
        self.settings = settings
        self.rng = random.Random(seed)
        self.tag = uuid.uuid4().hex[:6]
        self.attempted: list[Row] = []
        self.committed = 0
        self.stop = asyncio.Event()

    def _row(self) -> Row:
        rng = self.rng
        bucket = FIRST + timedelta(minutes=rng.randrange(0, 4 * 24 * 60 + 600))
        count = rng.randint(1, 40)
        amounts: list[Decimal | None] = [None, None, None]
        if rng.random() < 0.7:
            values = sorted(Decimal(rng.randint(-500, 100_000)) / 1000 for _ in range(3))
            amounts = [sum(values, Decimal(0)), values[0], values[-1]]
        return {
            "bucket": bucket,
            "type": f"new_{self.tag}_{len(self.attempted)}",
            "source": rng.choice(["", "web"]),
            "count": count,
            "sum_properties_amount": amounts[0],
            "min_properties_amount": amounts[1],
            "max_properties_amount": amounts[2],
        }

    async def run(self) -> None:
        conn = await asyncpg.connect(str(self.settings.postgres_url))
        try:
            while not self.stop.is_set():
                row = self._row()
                self.attempted.append(row)  # before the insert: a row the walk sees is always listed
                async with conn.transaction():  # every table of the rollup, as the consumer writes them
                    for statement in COARSE_INSERTS:
                        await conn.execute(statement, *(row[c] for c in ALL_FIELDS))
                self.committed += 1
                await asyncio.sleep(0.003)
        finally:
            await conn.close()

    async def wait_past(self, mark: int) -> None:
        deadline = time.monotonic() + 5
        while self.committed <= mark:
            assert time.monotonic() < deadline, "the inserter stalled"
            await asyncio.sleep(0.001)


@pytest.mark.parametrize(
    ("params", "order"),
    [
        ({"granularity": "minute"}, ["bucket", "type", "source"]),
        ({"granularity": "minute", "order": "-count"}, ["-count", "bucket", "type", "source"]),
        (
            {
                "granularity": "hour",
                "fields": "bucket,type,sum_properties_amount,count",
                "order": "-sum_properties_amount",
            },
            ["-sum_properties_amount", "bucket", "type"],
        ),
        (
            {
                "granularity": "day",
                "fields": "bucket,type,min_properties_amount",
                "order": "min_properties_amount,-type",
            },
            ["min_properties_amount", "-type", "bucket"],
        ),
    ],
    ids=["default", "-count", "-sum-hourly", "min-daily"],
)
async def test_cursor_walk_is_stable_under_concurrent_inserts(
    loaded: tuple[Settings, list[Row]], params: dict[str, str], order: list[str]
) -> None:
    settings, rows = loaded
    fields = params.get("fields", ",".join(DEFAULT_FIELDS)).split(",")
    granularity = params["granularity"]
    group = [f for f in fields if f == "bucket" or f in ("type", "source")]
    existing = wire(sort_rows(expected(rows, granularity, fields, START, END), order))
    inserter = Inserter(settings, seed=len(order))
    query = {**WHOLE, **params, "limit": "7"}
    got: list[Row] = []
    pages = 0
    # no-cache: every page is read from Postgres as it is now, never from an earlier answer.
    async with running(settings, headers={"Cache-Control": "no-cache"}) as (http, _):
        task = asyncio.create_task(inserter.run())
        try:
            await inserter.wait_past(0)
            cursor: str | None = None
            while True:
                response = await http.get(PATH, params={**query, **({"cursor": cursor} if cursor else {})})
                assert response.status_code == 200, response.text
                assert response.headers["x-cache"] == "miss"
                page = exact(response)
                assert len(page["data"]) <= 7
                got.extend(page["data"])
                pages += 1
                assert pages < 500, "the walk does not end"
                cursor = page["next_cursor"]
                if cursor is None:
                    break
                await inserter.wait_past(inserter.committed)  # at least one new row before the next page
        finally:
            inserter.stop.set()
            await task
    keys = [tuple(r[g] for g in group) for r in got]
    assert len(set(keys)) == len(keys), "a group key was returned twice"
    old = [r for r in got if not r["type"].startswith("new_")]
    new = [r for r in got if r["type"].startswith("new_")]
    assert old == existing  # every pre-existing row exactly once, in order
    inserted = {
        tuple(r[g] for g in group): r for r in wire(expected(inserter.attempted, granularity, fields, START, END))
    }
    assert all(inserted.get(tuple(r[g] for g in group)) == r for r in new), "a returned row was never inserted"
    assert got == sort_rows(got, order)  # keyset pages follow one another in the total order
    assert inserter.committed >= pages - 1 and new, (inserter.committed, len(new))
