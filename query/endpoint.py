"""GET /v1/rollups/{name} as a plain ASGI app: a dashboard query, served through the cache.

A cache hit is most of what this route serves, and it should cost little more than the
HTTP request: one pass over the headers, authentication (a cached principal), the query
resolved to its cache key (`query.keys`, remembered per query string), one Redis round
trip for the entry and its rollup's version, and the stored bytes written out with their
stored ETag. No dependency resolution, no response model, no re-encoding: the FastAPI
route this replaces spent most of a hit there (docs/performance.md has the profile). A
miss, a stale entry, an export and every error go the same way, through `query.cache`,
`query.service` and `core.problems`. Its OpenAPI description is `query.openapi`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, cast

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from core import metrics
from core.auth import authorize
from core.http import request_headers
from core.problems import TallyError, problem_for
from query.cache import Outcome, Reason
from query.cache_policy import Entry, etag_matches, forces_refresh, ttl_for
from query.export import open_export
from query.keys import Resolved
from query.render import MEDIA_TYPES, serving
from query.service import run_query
from query.state import QueryState

PATH = "/v1/rollups/{name}"
DEADLINE_MARGIN_SECONDS = 1.0  # past the statement timeout, before a query gives up on Postgres
X_CACHE: dict[Outcome, str] = {"hit": "hit", "stale": "stale", "miss": "miss", "coalesced": "miss", "bypass": "bypass"}
_WANTED = (b"authorization", b"if-none-match", b"cache-control")


def attachment(rollup: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{rollup}.csv"'}  # rollup names are [a-z0-9_]


class _Observed:
    """The query metrics of one request, through children made once (core.metrics.Children)."""

    def __init__(self) -> None:
        self._outcomes = metrics.Children(metrics.cache_outcomes)
        self._seconds = metrics.Children(metrics.query_seconds)
        self._rows = metrics.Children(metrics.query_rows)

    def record(self, rollup: str, outcome: str, seconds: float, rows: int) -> None:
        self._outcomes(outcome).inc()
        self._seconds(rollup, outcome).observe(seconds)
        if rows:
            self._rows(rollup).inc(rows)


class GetRollup:
    """The ASGI app of `GET /v1/rollups/{name}`, mounted as a Starlette route (methods, 405s and
    the route template for metrics come from the router). A class, so Starlette calls it as ASGI."""

    path = PATH  # the route template core.http.MetricsMiddleware labels requests with

    def __init__(self) -> None:
        self._observed = _Observed()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self  # as FastAPI's routes do; a Starlette Route does not
        try:
            await self._get(scope, receive, send)
        except TallyError as exc:
            await problem_for(exc, scope["method"], scope["path"])(scope, receive, send)

    async def _get(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        state = cast(dict[str, Any], scope["state"])
        st = cast(QueryState, state)
        settings = st["settings"]
        headers = request_headers(scope, _WANTED)
        await authorize(state, headers.get(b"authorization"), "query")
        now = datetime.now(UTC)
        resolved = st["resolver"].resolve(scope["path_params"]["name"], scope["query_string"].decode("latin-1"), now)
        q = resolved.query
        # The server enforces the statement timeout; this bounds the wait when it cannot (frozen, partitioned).
        deadline = settings.statement_timeout_ms / 1000 + DEADLINE_MARGIN_SECONDS
        if q.export:
            await self._export(scope, receive, send, st, resolved, started, deadline)
            return

        async def compute(reason: Reason) -> Entry:
            # Only an entry being made needs its lifetime: a hit does not pay for it.
            ttl = ttl_for(
                q.range.end,
                now,
                lateness_seconds=settings.lateness_seconds,
                fresh=settings.cache_fresh_seconds,
                stale=settings.cache_stale_seconds,
                closed_fresh=settings.cache_closed_fresh_seconds,
                versioned=settings.cache_versioned_fresh_seconds,
                refresh=settings.cache_refresh_seconds,
            )
            return await run_query(
                st["engine"],
                resolved.rollup,
                q,
                resolved.after,
                secret=settings.cursor_secret,
                ttl=ttl,
                reason=reason,
                deadline=deadline,
            )

        force = forces_refresh(headers.get(b"cache-control"))
        entry, outcome = await st["cache"].fetch(
            resolved.key, resolved.version_key, compute, force=force, rollup=q.rollup
        )
        self._observed.record(q.rollup, outcome, time.perf_counter() - started, entry.rows)
        await _send_entry(send, entry, X_CACHE[outcome], q.format, q.rollup, headers.get(b"if-none-match"), started)

    async def _export(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        st: QueryState,
        resolved: Resolved,
        started: float,
        deadline: float,
    ) -> None:
        q = resolved.query
        export = await open_export(st["engine"], st["exports"], resolved.rollup, q, resolved.after, deadline=deadline)
        self._observed.record(q.rollup, "stream", time.perf_counter() - started, 0)
        headers = {"X-Cache": "stream", **attachment(q.rollup)}
        if export.total is not None:
            headers["X-Total-Count"] = str(export.total)
        await StreamingResponse(export.body, media_type=MEDIA_TYPES["csv"], headers=headers)(scope, receive, send)


async def _send_entry(
    send: Send, entry: Entry, cache: str, fmt: str, rollup: str, if_none_match: str | None, started: float
) -> None:
    """The stored bytes and validators, with this response's own `meta` (cache outcome, age, time)."""
    age = entry.age(time.time())
    raw: list[tuple[bytes, bytes]] = [
        (b"x-cache", cache.encode()),
        (b"age", str(int(age)).encode()),
        (b"etag", entry.etag.encode("latin-1")),
        (b"cache-control", f"private, max-age={max(0, int(entry.ttl.fresh - age))}".encode()),
    ]
    if entry.next_cursor is not None:
        raw.append((b"x-next-cursor", entry.next_cursor.encode("latin-1")))
    if entry.total is not None:
        raw.append((b"x-total-count", str(entry.total).encode()))
    if etag_matches(if_none_match, entry.etag):
        await send({"type": "http.response.start", "status": 304, "headers": raw})
        await send({"type": "http.response.body", "body": b""})
        return
    if fmt == "csv":
        body = entry.body
        raw += [(name.lower().encode(), value.encode()) for name, value in attachment(rollup).items()]
    else:
        served = {
            "query_ms": entry.query_ms,
            "cache": cache,
            "age": int(age),
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        body = serving(entry.body, served)
    raw += [(b"content-type", _content_type(entry.media_type)), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _content_type(media_type: str) -> bytes:
    """As Starlette's Response writes it: text types say their charset."""
    if media_type.startswith("text/") and "charset=" not in media_type:
        return f"{media_type}; charset=utf-8".encode()
    return media_type.encode()
