"""The OpenAPI description of POST /v1/events.

The route itself is a plain ASGI app (ingest.endpoint) with no FastAPI machinery on its path,
so FastAPI cannot describe it from its signature. This router is that description, in
FastAPI's own terms (the body, the Idempotency-Key header, the auth scheme, every answer); it
is only ever given to the OpenAPI generator (`documented_routes`), never mounted.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header
from starlette.routing import BaseRoute

from core.auth import auth_responses, require_scope
from schemas.api import IngestAccepted, Problem

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
    idempotency_key: Annotated[
        str | None,
        Header(
            description="Retry-safe key (IETF httpapi draft): a repeat gets the first answer, "
            "writes nothing again. Kept 24 h.",
            examples=["batch-2026-11-25-0001"],
        ),
    ] = None,
) -> IngestAccepted:
    """A batch: `{"events": [...]}`, a bare JSON array, or NDJSON. A 202 means every accepted
    event is durable in Kafka; `rejected` lists the others by index, with the reason."""
    raise NotImplementedError("described only: ingest.endpoint.post_events serves this route")


def documented_routes() -> list[BaseRoute]:
    """The ingest routes as OpenAPI should show them: behind the `ingest` scope."""
    documented = APIRouter()
    documented.include_router(
        router, dependencies=[Depends(require_scope("ingest"))], responses=auth_responses("ingest")
    )
    return list(documented.routes)
