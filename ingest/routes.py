"""POST /v1/events: one batch in, durable in Kafka before the 202 goes out."""

from __future__ import annotations

import time
from typing import Annotated, Any, TypedDict, cast

import orjson
from fastapi import APIRouter, Header, Request
from starlette.responses import Response

from core import metrics
from core.auth import KeyStore, Principal
from core.looplag import in_slices
from core.problems import PROBLEM_JSON, Unprocessable, problem_response
from core.settings import Settings
from ingest.body import UNPARSABLE, ParsedBatch, media_type, parse_batch, read_body
from ingest.idempotency import IdempotencyStore, StoredResponse, derived_event_id, fingerprint, validate_key
from ingest.ratelimit import RateLimiter
from ingest.writer import KafkaWriter
from schemas import envelope
from schemas.api import IngestAccepted, Problem
from schemas.events import InvalidEvent, assign_event_id, normalize_event


class IngestState(TypedDict):
    settings: Settings
    writer: KafkaWriter
    idempotency: IdempotencyStore
    limiter: RateLimiter
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
        408: {**_PROBLEM, "description": "The body did not arrive within TALLY_BODY_TIMEOUT_SECONDS"},
        409: {**_PROBLEM, "description": "A request with this Idempotency-Key is still in progress"},
        413: _PROBLEM,
        415: _PROBLEM,
        422: _PROBLEM,
        429: {**_PROBLEM, "description": "The key's events/s limit; see Retry-After and RateLimit-*"},
        431: {**_PROBLEM, "description": "Request headers larger than TALLY_MAX_HEADER_BYTES in all"},
        503: {**_PROBLEM, "description": "Kafka slow, down or the in-flight bound reached; see Retry-After"},
    },
)
async def post_events(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="Retry-safe key (IETF httpapi draft): a repeat gets the first answer, "
            "writes nothing again. Kept 24 h.",
            examples=["batch-2026-11-25-0001"],
        ),
    ] = None,
) -> Response:
    state = cast(IngestState, request.scope["state"])
    settings = state["settings"]
    principal: Principal = request.scope["state"]["principal"]  # set by require_scope; absent fails closed
    key = validate_key(idempotency_key) if idempotency_key is not None else None
    state["writer"].shed()
    content_length = request.headers.get("content-length")
    body = await read_body(
        request.stream(),
        content_length=int(content_length) if content_length and content_length.isdigit() else None,
        encoding=request.headers.get("content-encoding", ""),
        limit=settings.max_body_bytes,
        deadline_seconds=settings.body_timeout_seconds,
    )
    content_type = request.headers.get("content-type", "")
    batch = parse_batch(body, content_type, max_events=settings.max_events, native=True)

    if key is None:
        return await _ingest(request, state, principal, batch, None)
    claimed = await state["idempotency"].claim(principal.key_id, key, fingerprint(media_type(content_type), body))
    if isinstance(claimed, StoredResponse):
        metrics.idempotent_replays.inc()
        kind = "application/json" if claimed.status < 300 else PROBLEM_JSON
        return Response(claimed.body, claimed.status, media_type=kind, headers={"Idempotent-Replayed": "true"})
    try:
        response = await _ingest(request, state, principal, batch, key)
    except BaseException:
        await state["idempotency"].release(claimed)
        raise
    await state["idempotency"].complete(claimed, response.status_code, bytes(response.body))
    return response


async def _ingest(
    request: Request, state: IngestState, principal: Principal, batch: ParsedBatch, key: str | None
) -> Response:
    """Rate-limit, validate, write: the 202 (or the 422) for one parsed batch."""
    settings = state["settings"]
    quota = await state["limiter"].take(principal.key_id, len(batch.events), principal.rate_limit)
    headers = quota.headers() if quota else {}

    received_at = time.time_ns() // 1_000_000
    skew = 0 if batch.sent_at_ms is None else received_at - batch.sent_at_ms
    limits = settings.event_limits
    encoded: list[bytes] = []
    rejected: list[dict[str, Any]] = []

    def validate(start: int, stop: int) -> None:
        for index, raw in enumerate(batch.events[start:stop], start):
            if raw is UNPARSABLE:
                rejected.append({"index": index, "error": batch.line_errors[index]})
                metrics.events_rejected.labels(batch.reasons.get(index, "json")).inc()
                continue
            if key is not None:
                assign_event_id(raw, lambda: derived_event_id(principal.key_id, key, index))  # noqa: B023 - called at once
            try:
                encoded.append(normalize_event(raw, received_at, limits, skew))
            except InvalidEvent as exc:
                rejected.append({"index": index, "error": str(exc)})
                metrics.events_rejected.labels(exc.reason).inc()

    # 10,000 events are ~50 ms of CPU: validated in slices that let /healthz and other requests in.
    await in_slices(validate, len(batch.events))

    if not encoded:
        detail = "the batch has no events" if not batch.events else "no event in the batch is valid"
        return problem_response(
            422,
            Unprocessable.title,
            detail,
            slug=Unprocessable.slug,
            instance=request.url.path,
            errors=rejected,
            headers=headers,
        )

    request_id: str = request.scope["state"].get("request_id", "")
    values = list(envelope.pack(encoded, settings.envelope_max_bytes))
    await state["writer"].write(values, envelope.headers(request_id))
    metrics.events_accepted.inc(len(encoded))
    return Response(
        orjson.dumps({"accepted": len(encoded), "rejected": rejected}),
        status_code=202,
        media_type="application/json",
        headers=headers,
    )
