"""Errors never leak internals: real failures answer a generic problem with the request id; the log has the rest.

Failures are real, not simulated: a rollup table renamed behind a running `tally query`
process, Postgres and Redis URLs that point at nothing (with a password in them), an
exception raised in a route, and one raised after a streamed response has begun.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from sqlalchemy.engine import make_url
from starlette.responses import StreamingResponse

from core import devstack
from core.problems import INTERNAL_DETAIL
from core.settings import Settings
from ingest.app import create_app as ingest_app
from query.app import create_app as query_app
from tests.conftest import serve
from tests.processes import tally_process

pytestmark = pytest.mark.integration

ROLLUP = "/v1/rollups/events_by_type"
WHOLE = {"from": "2026-03-01T00:00:00Z", "to": "2026-05-01T00:00:00Z"}
PASSWORD = "hunter2-leak-canary"  # noqa: S105 - a canary to look for, not a credential
# What an error body must never contain: traceback and driver vocabulary, SQL, file paths, servers.
TELLTALES = ("Traceback", 'File "', ".py", "asyncpg", "sqlalchemy", "SQLSTATE", "SELECT", "FROM ", "relation",
             "agg_", "Error:", "Exception", "127.0.0.1", "localhost", "postgresql://", "redis://", PASSWORD)


def assert_generic_500(r: httpx.Response, request_id: str, path: str) -> None:
    assert r.status_code == 500, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["x-request-id"] == request_id
    assert r.json() == {
        "type": "https://tally.dev/problems/internal",
        "title": "Internal error",
        "status": 500,
        "detail": INTERNAL_DETAIL,
        "instance": path,
        "request_id": request_id,
    }
    assert_no_telltales(r)


def assert_no_telltales(r: httpx.Response, *extra: str) -> None:
    shown = r.text + "\n" + "\n".join(f"{k}: {v}" for k, v in r.headers.items())
    for word in (*TELLTALES, *extra):
        assert word not in shown, (word, shown)


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(orjson.loads(line))
    return out


async def logged(log_path: Path, request_id: str, level: str) -> list[dict[str, Any]]:
    """The JSON log lines of `request_id` at `level`, once the process has written them."""
    deadline = time.monotonic() + 10
    while True:
        found = [e for e in json_lines(log_path.read_text(errors="replace"))
                 if e.get("request_id") == request_id and e.get("level") == level]
        if found or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def sql(settings: Settings, statement: str) -> None:
    conn = await asyncpg.connect(str(settings.postgres_url))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def test_a_table_renamed_behind_a_running_query_process(migrated: Settings, tmp_path: Path) -> None:
    settings = migrated.model_copy(update={"log_format": "json", "max_limit": 20, "default_limit": 20})
    query = tally_process("query", settings, tmp_path).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{query.port}", timeout=30) as http:
            fresh = {"cache-control": "no-cache"}
            before = await http.get(ROLLUP, params=WHOLE, headers={**fresh, "x-request-id": "leak-probe-0"})
            assert before.status_code == 200, before.text
            assert "server" not in before.headers  # `tally query` does not name its server software
            await sql(migrated, "ALTER TABLE agg_events_by_type RENAME TO agg_events_by_type_moved")
            page = await http.get(ROLLUP, params=WHOLE, headers={**fresh, "x-request-id": "leak-probe-1"})
            export = await http.get(ROLLUP, params={**WHOLE, "format": "csv", "limit": "100"},
                                    headers={"x-request-id": "leak-probe-2"})  # a streamed export's first chunk
            await sql(migrated, "ALTER TABLE agg_events_by_type_moved RENAME TO agg_events_by_type")
            after = await http.get(ROLLUP, params=WHOLE, headers=fresh)
        assert_generic_500(page, "leak-probe-1", ROLLUP)
        assert_generic_500(export, "leak-probe-2", ROLLUP)
        assert after.status_code == 200  # the failure was the rename, and it is over
        for request_id in ("leak-probe-1", "leak-probe-2"):
            errors = await logged(query.log_path, request_id, "error")
            assert len(errors) == 1, query.log()[-3000:]
            assert errors[0]["msg"] == f"unhandled error answering GET {ROLLUP}"
            trace = errors[0]["exc"]
            assert "Traceback" in trace and "UndefinedTableError" in trace
            assert 'relation "agg_events_by_type" does not exist' in trace
            assert "SELECT" in trace  # SQLAlchemy's message carries the statement: for the operator only
    finally:
        query.stop()


def dead_url(url: str, scheme_port: int) -> str:
    return make_url(url).set(username="tally_leak", password=PASSWORD, port=scheme_port).render_as_string(
        hide_password=False)


async def test_unreachable_postgres_and_redis_name_no_server(
    migrated: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    pg_port, redis_port = devstack.free_port(), devstack.free_port()
    no_pg = migrated.model_copy(update={"postgres_url": dead_url(str(migrated.postgres_url), pg_port)})
    async with serve(query_app(no_pg)) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        r = await http.get(ROLLUP, params=WHOLE, headers={"x-request-id": "pg-down"})
        ready = await http.get("/readyz")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json() == {"type": "https://tally.dev/problems/unavailable", "title": "Service unavailable",
                        "status": 503, "detail": "the database is unreachable", "instance": ROLLUP}
    assert_no_telltales(r, str(pg_port))
    assert ready.status_code == 503 and ready.json()["checks"]["postgres"] is False
    assert_no_telltales(ready, str(pg_port))
    told = [rec.getMessage() for rec in caplog.records if rec.name == "core.problems"]
    assert any(f"GET {ROLLUP} answered 503" in m and str(pg_port) in m for m in told), told  # the log names it

    no_redis = migrated.model_copy(update={"redis_url": f"redis://:{PASSWORD}@127.0.0.1:{redis_port}/0"})
    async with serve(ingest_app(no_redis)) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        deadline = time.monotonic() + 20
        while (await http.get("/readyz")).json()["checks"]["kafka"] is not True:  # Kafka is up; only Redis is not
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        r = await http.post("/v1/events", json=[{"type": "a"}], headers={"idempotency-key": "k-1"})
    assert r.status_code == 503, r.text
    assert r.json()["detail"] == "the idempotency store cannot be reached (ConnectionError); retry shortly"
    assert_no_telltales(r, str(redis_port))


async def test_an_exception_in_a_route_is_logged_not_shown(
    migrated: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    secret = f"postgresql://tally:{PASSWORD}@10.9.8.7:5432/tally SELECT * FROM agg_secret"

    async def broken() -> None:
        raise RuntimeError(secret)

    async def broken_midway() -> StreamingResponse:
        async def rows() -> AsyncIterator[bytes]:
            yield b"bucket,count\r\n"
            raise RuntimeError(secret)

        return StreamingResponse(rows(), media_type="text/csv")

    for app in (ingest_app(migrated), query_app(migrated)):
        app.add_api_route("/v1/broken", broken)
        app.add_api_route("/v1/broken-midway", broken_midway)
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
            r = await http.get("/v1/broken", headers={"x-request-id": "route-bug"})
            received = b""
            with pytest.raises(httpx.RemoteProtocolError):  # the connection is cut: the client sees a broken body
                async with http.stream("GET", "/v1/broken-midway", headers={"x-request-id": "late-bug"}) as s:
                    assert s.status_code == 200
                    async for chunk in s.aiter_raw():
                        received += chunk
        assert_generic_500(r, "route-bug", "/v1/broken")
        assert_no_telltales(r, "10.9.8.7", "agg_secret")
        assert received == b"bucket,count\r\n"  # nothing of the error was written into the stream
        for request_id, path in (("route-bug", "/v1/broken"), ("late-bug", "/v1/broken-midway")):
            records = [rec for rec in caplog.records
                       if rec.name == "core.http" and getattr(rec, "request_id", None) == request_id]
            assert len(records) == 1, request_id
            assert records[0].getMessage() == f"unhandled error answering GET {path}"
            assert records[0].exc_info is not None and str(records[0].exc_info[1]) == secret
        caplog.clear()
