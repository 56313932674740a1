"""HTTP routes of the query API: list rollups, query one through the cache, report lag.

Parameters are declared here for OpenAPI (each with a description and an
example); validation happens in `query.params` over the raw query string, which
is also how unknown parameters and `filter[<dimension>]` are seen.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from starlette.responses import Response, StreamingResponse

from core import metrics
from core.problems import Unavailable
from query.cache import Outcome, Reason
from query.cache_policy import Entry, cache_key, etag_matches, forces_refresh, ttl_for
from query.cursor import decode
from query.export import open_export
from query.params import FORMATS, parse_query
from query.planner import order_kinds
from query.render import MEDIA_TYPES, serving
from query.service import database_errors, run_query
from query.state import state
from schemas.api import LagReport, Problem, QueryResult, RollupList, ServiceCounters
from schemas.rollups import GRANULARITIES

router = APIRouter()
DEADLINE_MARGIN_SECONDS = 1.0  # past the statement timeout, before a query gives up on Postgres
LAG_KAFKA_SECONDS = 3.0  # the lag probe's own bound on Kafka (query.lag)

X_CACHE: dict[Outcome, str] = {"hit": "hit", "stale": "stale", "miss": "miss", "coalesced": "miss", "bypass": "bypass"}
_PROBLEM_JSON: dict[str, Any] = {"application/problem+json": {}}
_PROBLEMS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "content": _PROBLEM_JSON, "description": "Invalid parameter; `detail` names it."},
    404: {"model": Problem, "content": _PROBLEM_JSON, "description": "No such rollup."},
    503: {"model": Problem, "content": _PROBLEM_JSON, "description": "Postgres unreachable or the query timed out."},
}


def _parameter(name: str, description: str, example: object, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
        "example": example,
    }


_TEXT: dict[str, Any] = {"type": "string"}
# Documented here, validated once by `query.params` over the raw query string (which is also
# how unknown parameters and `filter[<column>]` are seen). Declaring them as FastAPI
# parameters would validate each a second time on every request: half the CPU of a cache hit.
_QUERY_PARAMETERS: list[dict[str, Any]] = [
    _parameter(
        "from",
        "Start (inclusive), floored to the granularity: ISO 8601 with an offset, a bare date (midnight in `tz`), "
        "`now`, or relative (`-24h`, `-30m`, `-7d`, `-2w`). Default `-24h`.",
        "-24h",
        _TEXT,
    ),
    _parameter("to", "End (exclusive), ceiled to the granularity; same forms as `from`. Default `now`.", "now", _TEXT),
    _parameter(
        "granularity",
        "Bucket size; not finer than the rollup's table. Weeks start on Monday (ISO); months are calendar months. "
        "Default: the table's granularity.",
        "hour",
        {"type": "string", "enum": list(GRANULARITIES)},
    ),
    _parameter(
        "tz",
        "IANA time zone for day, week and month buckets (local midnights) and for bare dates in `from`/`to`; "
        "buckets are written with its UTC offset. Minute and hour buckets are the same instants in every zone. "
        "Default `UTC`.",
        "Europe/Paris",
        _TEXT,
    ),
    _parameter(
        "fields",
        "Comma-separated columns to return: `bucket`, dimensions, measures. Only these are selected and grouped; "
        "without `bucket` the result is totals over the range. Default: all.",
        "bucket,type,count,sum_properties_amount",
        _TEXT,
    ),
    {
        "name": "filter",
        "in": "query",
        "style": "deepObject",
        "explode": True,
        "required": False,
        "description": "`filter[<dimension>]=a,b`: keep rows whose dimension is one of the comma-separated "
        "values (an empty value matches a missing dimension). `filter[<measure>]=gte:10,lt:100`: keep rows "
        "whose merged measure is within the bounds (ops `gt`, `gte`, `lt`, `lte`, `eq`; a NULL measure "
        "matches no bound); the measure need not be in `fields`. Repeatable for several columns.",
        "schema": {"type": "object", "additionalProperties": {"type": "string"}},
        "example": {"type": "purchase,page_view", "count": "gte:10"},
    },
    _parameter(
        "order",
        "Comma-separated selected columns, `-` for descending; NULLs sort last. The remaining group columns "
        "are appended as tie-breakers. Default: the group columns ascending, bucket first.",
        "-count,bucket",
        _TEXT,
    ),
    _parameter(
        "limit",
        "Page size, 1 to TALLY_MAX_LIMIT (default 10000); default TALLY_DEFAULT_LIMIT. With `format=csv` it may "
        "go up to TALLY_MAX_EXPORT_ROWS: such an export is streamed, not cached (`X-Cache: stream`), and has "
        "no next cursor.",
        100,
        {"type": "integer", "minimum": 1},
    ),
    _parameter(
        "cursor",
        "The `next_cursor` of the previous page, with the same other parameters (signed; a modified cursor or "
        "one from another query is a 400).",
        "eyJrIjpbIjIwMjYtMTEtMjVUMTM6MDA6MDBaIl19.c2ln",
        _TEXT,
    ),
    _parameter(
        "offset",
        "Rows to skip (LIMIT/OFFSET compatibility, at most TALLY_MAX_OFFSET); not with `cursor`.",
        0,
        {"type": "integer", "minimum": 0},
    ),
    _parameter(
        "format",
        "`json` (rows as objects), `columns` (an array per column) or `csv` (next cursor in `X-Next-Cursor`).",
        "json",
        {"type": "string", "enum": list(FORMATS)},
    ),
    _parameter(
        "total",
        "Also count the rows the whole query matches: `meta.total` and the `X-Total-Count` header. Costs a "
        "second aggregate over the range.",
        True,
        {"type": "boolean"},
    ),
]


@router.get("/v1/rollups", response_model=RollupList, tags=["rollups"], summary="List rollups")
async def list_rollups(request: Request) -> RollupList:
    """Every rollup with its dimensions, measures (and how they merge), granularities and `where`."""
    return state(request)["catalog"].describe()


@router.get(
    "/v1/rollups/{name}",
    tags=["rollups"],
    summary="Query a rollup",
    response_model=QueryResult,
    responses={
        200: {
            "description": "Rows (`format=json`), columns (`format=columns`) or CSV (`format=csv`).",
            "content": {"text/csv": {"schema": {"type": "string"}}},
        },
        304: {"description": "Not modified (`If-None-Match` matched the `ETag`)."},
        **_PROBLEMS,
    },
    openapi_extra={"parameters": _QUERY_PARAMETERS},
)
async def query_rollup(
    request: Request,
    name: Annotated[
        str,
        Path(
            description="Rollup name, from `GET /v1/rollups`.",
            examples=["events_by_type"],
            openapi_examples={"example": {"value": "events_by_type"}},
        ),
    ],
) -> Response:
    """Aggregates of one rollup, re-bucketed exactly and served through the Redis cache.

    Headers: `X-Cache: hit|stale|miss|bypass|stream`, `Age`, `ETag` (send `If-None-Match` for a 304);
    `Cache-Control: no-cache` on the request forces a fresh read. `meta` reports the query time
    (`query_ms`), the stored rows merged (`rows_read`), the cache outcome and age, and `elapsed_ms`.
    """
    st = state(request)
    settings = st["settings"]
    started = time.perf_counter()
    rollup = st["catalog"].get(name)
    now = datetime.now(UTC)
    q = parse_query(rollup.spec, request.query_params.multi_items(), st["limits"], now)
    after = None
    if q.cursor is not None:
        position = decode(q.cursor, q.fingerprint(), order_kinds(rollup.spec, q.order), settings.cursor_secret)
        q, after = q.with_range(position.range), position.values
    # The server enforces the statement timeout; this bounds the wait when it cannot (frozen, partitioned).
    deadline = settings.statement_timeout_ms / 1000 + DEADLINE_MARGIN_SECONDS
    if q.export:
        export = await open_export(st["engine"], st["exports"], rollup, q, after, deadline=deadline)
        metrics.cache_outcomes.labels("stream").inc()
        metrics.query_seconds.labels(q.rollup, "stream").observe(time.perf_counter() - started)
        headers = {"X-Cache": "stream", **_attachment(q.rollup)}
        if export.total is not None:
            headers["X-Total-Count"] = str(export.total)
        return StreamingResponse(export.body, media_type=MEDIA_TYPES["csv"], headers=headers)
    ttl = ttl_for(
        q.range.end,
        now,
        lateness_seconds=settings.lateness_seconds,
        fresh=settings.cache_fresh_seconds,
        stale=settings.cache_stale_seconds,
        closed_fresh=settings.cache_closed_fresh_seconds,
    )

    async def compute(reason: Reason) -> Entry:
        return await run_query(
            st["engine"], rollup, q, after, secret=settings.cursor_secret, ttl=ttl, reason=reason, deadline=deadline
        )

    key = cache_key(settings.cache_prefix, q.identity())
    entry, outcome = await st["cache"].fetch(key, compute, force=forces_refresh(request.headers.get("cache-control")))
    metrics.cache_outcomes.labels(outcome).inc()
    metrics.query_seconds.labels(q.rollup, outcome).observe(time.perf_counter() - started)
    metrics.query_rows.labels(q.rollup).inc(entry.rows)
    return _respond(request, entry, outcome, q.format, q.rollup, started)


def _attachment(rollup: str) -> dict[str, str]:
    return {"Content-Disposition": f'attachment; filename="{rollup}.csv"'}  # rollup names are [a-z0-9_]


def _respond(request: Request, entry: Entry, outcome: Outcome, fmt: str, rollup: str, started: float) -> Response:
    age = entry.age(time.time())
    headers = {
        "X-Cache": X_CACHE[outcome],
        "Age": str(int(age)),
        "ETag": entry.etag,
        "Cache-Control": f"private, max-age={max(0, int(entry.ttl.fresh - age))}",
    }
    if entry.next_cursor is not None:
        headers["X-Next-Cursor"] = entry.next_cursor
    if entry.total is not None:
        headers["X-Total-Count"] = str(entry.total)
    if etag_matches(request.headers.get("if-none-match"), entry.etag):
        return Response(status_code=304, headers=headers)
    if fmt == "csv":
        return Response(entry.body, media_type=entry.media_type, headers={**headers, **_attachment(rollup)})
    served = {
        "query_ms": entry.query_ms,
        "cache": X_CACHE[outcome],
        "age": int(age),
        "elapsed_ms": round((time.perf_counter() - started) * 1000, 3),
    }
    return Response(serving(entry.body, served), media_type=entry.media_type, headers=headers)


@router.get(
    "/v1/ops/lag",
    response_model=LagReport,
    tags=["ops"],
    summary="Consumer lag and verdicts per partition",
    responses={503: {"model": Problem, "content": _PROBLEM_JSON, "description": "Kafka or Postgres unreachable."}},
)
async def lag(request: Request) -> LagReport:
    """End offset, stored offset, lag in records and in seconds (age of the oldest unapplied record),
    seconds since the stored offset moved, and a verdict (OK, WARN, STALL, STOP) per partition and for
    the group, over the sampler's window of observations plus this measurement."""
    st = state(request)
    # Postgres down or restarting: a 503, not a 500. Frozen: the probe would wait for ever (the
    # server's statement timeout cannot fire), so it gets the query deadline plus its Kafka time.
    seconds = st["settings"].statement_timeout_ms / 1000 + DEADLINE_MARGIN_SECONDS + LAG_KAFKA_SECONDS
    try:
        async with asyncio.timeout(seconds), database_errors(st["engine"]):
            report = await st["lag"].report()
    except TimeoutError as exc:
        raise Unavailable(f"the lag probe did not finish within {seconds:g} s", retry_after=1) from exc
    return st["lag_sampler"].judge(report)


@router.get(
    "/v1/ops/counters",
    response_model=ServiceCounters,
    tags=["ops"],
    summary="Ingest and consumer counters, for rates",
)
async def counters(request: Request) -> ServiceCounters:
    """Events accepted and rejected by ingest, backpressure refusals, events applied by consumers and
    dead letters, each summed over its labels, from the /metrics of every process named in
    TALLY_METRICS_TARGETS (scraped now, in parallel, each within 1 s). Two answers give rates: a
    counter that went down was restarted. A target that did not answer is listed with `up: false`."""
    return await state(request)["counters"].scrape()
