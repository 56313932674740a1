"""HTTP routes of the query API that FastAPI serves: the rollup list and the ops reports.

`GET /v1/rollups/{name}`, the dashboards' hot route, is a plain ASGI app (query.endpoint),
described for OpenAPI by query.openapi.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from core.problems import Unavailable
from query.endpoint import DEADLINE_MARGIN_SECONDS
from query.service import database_errors
from query.state import state
from schemas.api import LagReport, Problem, RollupList, ServiceCounters

router = APIRouter()
LAG_KAFKA_SECONDS = 3.0  # the lag probe's own bound on Kafka (query.lag)

_PROBLEM_JSON: dict[str, Any] = {"application/problem+json": {}}


@router.get("/v1/rollups", response_model=RollupList, tags=["rollups"], summary="List rollups")
async def list_rollups(request: Request) -> RollupList:
    """Every rollup with its dimensions, measures (and how they merge), granularities and `where`."""
    return state(request)["catalog"].describe()


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
