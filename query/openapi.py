"""The OpenAPI description of GET /v1/rollups/{name}.

The route itself is a plain ASGI app (query.endpoint) with no FastAPI machinery on its path,
so FastAPI cannot describe it from its signature. This router is that description, in
FastAPI's own terms (the parameters, the auth scheme, every answer); it is only ever given to
the OpenAPI generator (`documented_routes`), never mounted.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from core.auth import auth_responses, require_scope
from query.params import FORMATS
from schemas.api import Problem, QueryResult
from schemas.rollups import GRANULARITIES

router = APIRouter(dependencies=[Depends(require_scope("query"))], responses=auth_responses("query"))

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
    raise NotImplementedError  # never mounted: query.endpoint.GetRollup serves this route


def documented_routes() -> list[BaseRoute]:
    """The description of the plain ASGI query route, for `get_openapi`."""
    return list(router.routes)
