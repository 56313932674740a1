"""POST /v1/events as a plain ASGI app: one batch in, durable in Kafka before the 202 goes out.

The hot route does only its own work: one pass over the headers, the body read with its
limits and deadline, authentication, the rate limit, validation and the write. It has no
dependency resolution, no response model and no second header parse (docs/performance.md has
the profile that asked for this); Starlette's Request only streams the body. Its OpenAPI description is
`ingest.openapi`; the app mounts this as the route (ingest.app).
"""

from __future__ import annotations

import time
from typing import Any, TypedDict, cast

import orjson
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from core import metrics
from core.auth import KeyStore, Principal, authorize
from core.http import request_headers
from core.looplag import in_slices
from core.problems import PROBLEM_JSON, TallyError, Unprocessable, problem_for, problem_response
from core.settings import Settings
from ingest.body import ParsedBatch, media_type, parse_batch_yielding, read_body
from ingest.idempotency import IdempotencyStore, StoredResponse, derived_event_id, fingerprint, validate_key
from ingest.ratelimit import RateLimiter
from ingest.writer import KafkaWriter
from schemas import envelope
from schemas.events import EventLimits
from schemas.native import Normalizer

PATH = "/v1/events"
_WANTED = (b"content-type", b"content-length", b"content-encoding", b"authorization", b"idempotency-key")
_JSON = b"application/json"


class IngestState(TypedDict):
    settings: Settings
    limits: EventLimits  # settings.event_limits, built once
    writer: KafkaWriter
    idempotency: IdempotencyStore
    limiter: RateLimiter
    keys: KeyStore | None  # for authentication; None when auth is off


class _Answer:
    """A response as the route builds it: status, body, content type and extra headers."""

    __slots__ = ("body", "headers", "media_type", "status")

    def __init__(self, status: int, body: bytes, media_type: bytes, headers: dict[str, str] | None = None) -> None:
        self.status, self.body, self.media_type, self.headers = status, body, media_type, headers or {}

    async def send(self, send: Send) -> None:
        raw = [(b"content-type", self.media_type), (b"content-length", str(len(self.body)).encode())]
        raw += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": raw})
        await send({"type": "http.response.body", "body": self.body})


class PostEvents:
    """The ASGI app of `POST /v1/events`, mounted as a Starlette route (methods, 405s and the route
    template for metrics come from the router). A class, so Starlette calls it as ASGI."""

    path = PATH  # the route template core.http.MetricsMiddleware labels requests with

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self  # as FastAPI's routes do; a Starlette Route does not
        try:
            answer = await _post(scope, receive)
        except TallyError as exc:
            await problem_for(exc, "POST", PATH)(scope, receive, send)
            return
        await answer.send(send)


async def _post(scope: Scope, receive: Receive) -> _Answer:
    state = cast(dict[str, Any], scope["state"])
    ingest = cast(IngestState, state)
    settings = ingest["settings"]
    headers = request_headers(scope, _WANTED)
    principal = await authorize(state, headers.get(b"authorization"), "ingest")
    raw_key = headers.get(b"idempotency-key")
    key = validate_key(raw_key) if raw_key is not None else None
    ingest["writer"].shed()
    content_length = headers.get(b"content-length")
    body = await read_body(
        Request(scope, receive).stream(),  # Starlette's: ends on the last chunk, ClientDisconnect
        content_length=int(content_length)
        if content_length and content_length.isascii() and content_length.isdigit()
        else None,
        encoding=headers.get(b"content-encoding", ""),
        limit=settings.max_body_bytes,
        deadline_seconds=settings.body_timeout_seconds,
    )
    content_type = headers.get(b"content-type", "")
    batch = await parse_batch_yielding(body, content_type, max_events=settings.max_events, native=ingest["limits"])
    body_bytes, body_print = len(body), "" if key is None else fingerprint(media_type(content_type), body)
    del body  # not held through the waits ahead

    if key is None:
        return await _ingest(state, principal, batch, body_bytes, None)
    claimed = await ingest["idempotency"].claim(principal.key_id, key, body_print)
    if isinstance(claimed, StoredResponse):
        metrics.idempotent_replays.inc()
        kind = _JSON if claimed.status < 300 else PROBLEM_JSON.encode()
        return _Answer(claimed.status, claimed.body, kind, {"Idempotent-Replayed": "true"})
    try:
        answer = await _ingest(state, principal, batch, body_bytes, key)
    except BaseException:
        await ingest["idempotency"].release(claimed)
        raise
    await ingest["idempotency"].complete(claimed, answer.status, answer.body)
    return answer


async def _ingest(
    state: dict[str, Any], principal: Principal, batch: ParsedBatch, body_bytes: int, key: str | None
) -> _Answer:
    """Rate-limit, validate, write: the 202 (or the 422) for one parsed batch."""
    ingest = cast(IngestState, state)
    settings = ingest["settings"]
    quota = await ingest["limiter"].take(principal.key_id, len(batch.events), principal.rate_limit)
    headers = quota.headers() if quota else {}

    received_at = time.time_ns() // 1_000_000
    skew = 0 if batch.sent_at_ms is None else received_at - batch.sent_at_ms
    derive = None if key is None else (lambda index: derived_event_id(principal.key_id, key, index))
    normalizer = Normalizer(batch.events, received_at, ingest["limits"], skew, derive, body_bytes=body_bytes)
    # 10,000 events are several ms of CPU: validated in slices that let /healthz and other requests in.
    await in_slices(normalizer.run, len(batch.events))
    done = normalizer.finish(settings.envelope_max_bytes)
    sent = len(batch.events)
    # The events are encoded: free them before the wait for Kafka's ack, where a request spends
    # most of its time (16 requests of 1,000 events held ~20 MiB of decoded events there).
    del normalizer
    batch.events.clear()

    rejected: list[dict[str, Any]] = []
    if batch.line_errors or done.rejected:
        refusals = [(i, error, batch.reasons.get(i, "json")) for i, error in batch.line_errors.items()]
        refusals += [(i, str(exc), exc.reason) for i, exc in done.rejected]
        for index, error, reason in sorted(refusals, key=lambda refusal: refusal[0]):
            rejected.append({"index": index, "error": error})
            metrics.events_rejected.labels(reason).inc()

    if not done.accepted:
        detail = "the batch has no events" if not sent else "no event in the batch is valid"
        response = problem_response(
            422, Unprocessable.title, detail, slug=Unprocessable.slug, instance=PATH, errors=rejected, headers=headers
        )
        return _Answer(422, bytes(response.body), PROBLEM_JSON.encode(), headers)

    await ingest["writer"].write(done.values, envelope.headers(state.get("request_id", "")))
    metrics.events_accepted.inc(done.accepted)
    return _Answer(202, orjson.dumps({"accepted": done.accepted, "rejected": rejected}), _JSON, headers)
