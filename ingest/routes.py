"""POST /v1/events: one batch in, durable in Kafka before the 202 goes out."""

from __future__ import annotations

import time
from typing import Any, TypedDict, cast

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from core import metrics
from core.auth import KeyStore
from core.problems import Unprocessable
from core.settings import Settings
from ingest.body import UNPARSABLE, parse_batch, read_body
from ingest.writer import KafkaWriter
from schemas import envelope
from schemas.api import IngestAccepted, Problem
from schemas.events import InvalidEvent, normalize_event


class IngestState(TypedDict):
    settings: Settings
    writer: KafkaWriter
    keys: KeyStore | None  # for `require_scope`; None when auth is off


router = APIRouter(tags=["ingest"])

_PROBLEM = {"model": Problem, "content": {"application/problem+json": {}}}
_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": 'A batch: `{"events": [...]}`, a bare JSON array, or NDJSON. '
        "`Content-Encoding: gzip` is accepted.",
        "content": {
            "application/json": {
                "schema": {"type": "object", "properties": {"events": {"type": "array", "items": {"type": "object"}}}},
                "example": {
                    "events": [
                        {
                            "type": "purchase",
                            "source": "web",
                            "ts": "2026-11-25T12:00:00Z",
                            "properties": {"amount": 12.5, "country": "DE"},
                        }
                    ]
                },
            },
            "application/x-ndjson": {"schema": {"type": "string"}},
        },
    }
}


@router.post(
    "/v1/events",
    status_code=202,
    response_model=IngestAccepted,
    summary="Ingest a batch of events",
    openapi_extra=_BODY_DOC,
    responses={
        400: _PROBLEM,
        413: _PROBLEM,
        415: _PROBLEM,
        422: _PROBLEM,
        503: {**_PROBLEM, "description": "Kafka slow, down or the in-flight bound reached; see Retry-After"},
    },
)
async def post_events(request: Request) -> Response:
    state = cast(IngestState, request.scope["state"])
    settings = state["settings"]
    content_length = request.headers.get("content-length")
    body = await read_body(
        request.stream(),
        content_length=int(content_length) if content_length and content_length.isdigit() else None,
        encoding=request.headers.get("content-encoding", ""),
        limit=settings.max_body_bytes,
    )
    batch = parse_batch(body, request.headers.get("content-type", ""), max_events=settings.max_events)

    received_at = time.time_ns() // 1_000_000
    limits = settings.event_limits
    encoded: list[bytes] = []
    rejected: list[dict[str, Any]] = []
    for index, raw in enumerate(batch.events):
        if raw is UNPARSABLE:
            rejected.append({"index": index, "error": batch.line_errors[index]})
            metrics.events_rejected.labels("json").inc()
            continue
        try:
            encoded.append(normalize_event(raw, received_at, limits))
        except InvalidEvent as exc:
            rejected.append({"index": index, "error": str(exc)})
            metrics.events_rejected.labels(exc.reason).inc()

    if not encoded:
        detail = "the batch has no events" if not batch.events else "no event in the batch is valid"
        raise Unprocessable(detail, errors=rejected)

    request_id: str = request.scope["state"].get("request_id", "")
    values = list(envelope.pack(encoded, settings.envelope_max_bytes))
    await state["writer"].write(values, envelope.headers(request_id))
    metrics.events_accepted.inc(len(encoded))
    return Response(
        orjson.dumps({"accepted": len(encoded), "rejected": rejected}),
        status_code=202,
        media_type="application/json",
    )
