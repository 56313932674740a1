"""Idempotency-Key (IETF httpapi draft): a retried batch gets the first answer and
writes nothing again.

A request with a key first claims it in Redis (SET NX with a short TTL). The
claimant writes to Kafka and stores its final answer for `ttl` seconds; anyone
else with the same key gets that answer replayed when the body is the same, a 422
when it differs, or a 409 while the first request is still in flight. An answer
that the client should retry (429, 503) is not stored: the claim is released.

If Redis cannot be reached, a request with a key is refused with 503 rather than
accepted without the guarantee it asked for; requests without a key are unaffected.
Once the events are in Kafka, storing the answer is retried for up to STORE_SECONDS:
an answer that is never stored leaves the claim to expire, and a retry after that
writes the batch again (counted once only with TALLY_DEDUP).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core import metrics
from core.problems import BadRequest, TallyError, Unavailable, Unprocessable

log = logging.getLogger(__name__)
STORED_STATUSES = frozenset({202, 422})
STORE_SECONDS = 2.0  # how long a 202 may wait for its answer to be kept, through a Redis blip
STORE_BACKOFF = (0.05, 0.1, 0.2, 0.4)  # then 0.4 s between tries
_NAMESPACE = uuid.UUID("6d1c1f2e-3b0a-4f55-9a3e-7a11e5e7a11e")
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class IdempotencyConflict(TallyError):
    status, title, slug = 409, "Request in progress", "idempotency-conflict"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    """Held by the one request that may write for this key."""

    redis_key: str
    token: str  # the exact pending value written, so only its writer can release it
    fingerprint: str


def validate_key(value: str) -> str:
    if not 1 <= len(value) <= 255 or not value.isascii() or not value.isprintable():
        raise BadRequest("Idempotency-Key must be 1 to 255 printable ASCII characters")
    return value


def fingerprint(media_type: str, body: bytes) -> str:
    return hashlib.sha256(media_type.encode() + b"\0" + body).hexdigest()


def derived_event_id(principal: str, key: str, index: int) -> str:
    """The id given to an event without one, so that a retry re-sends the same ids
    and event_id de-duplication can recognise a write whose 202 was lost."""
    return str(uuid.uuid5(_NAMESPACE, f"{principal}\0{key}\0{index}"))


class IdempotencyStore:
    def __init__(self, redis: Redis, prefix: str, *, ttl_seconds: int, lock_seconds: float, retry_after: int) -> None:
        self._redis = redis
        self._prefix = prefix
        self._ttl = ttl_seconds
        self._lock_ms = int(lock_seconds * 1000)
        self._retry_after = retry_after

    @property
    def redis(self) -> Redis:
        return self._redis

    async def claim(self, principal: str, key: str, fp: str) -> Claim | StoredResponse:
        """The right to write for this key, or the stored answer to replay."""
        redis_key = f"{self._prefix}idem:{principal}:{key}"
        token = uuid.uuid4().hex
        pending = orjson.dumps({"state": "pending", "fp": fp, "token": token})
        try:
            for _ in range(3):
                if await self._redis.set(redis_key, pending, nx=True, px=self._lock_ms):
                    return Claim(redis_key, pending.decode(), fp)
                raw = await self._redis.get(redis_key)
                if raw is not None:
                    return self._existing(orjson.loads(raw), fp)
        except RedisError as exc:
            raise self._unavailable(exc) from None
        raise self._unavailable(None)

    def _existing(self, record: dict[str, Any], fp: str) -> StoredResponse:
        if record["fp"] != fp:
            raise Unprocessable("this Idempotency-Key was used with a different request body")
        if record["state"] == "pending":
            raise IdempotencyConflict(
                "a request with this Idempotency-Key is still in progress; retry shortly",
                headers={"Retry-After": str(self._retry_after)},
            )
        return StoredResponse(record["status"], base64.b64decode(record["body"]))

    async def complete(self, claim: Claim, status: int, body: bytes) -> None:
        """Keep the final answer, or release the claim when the client should retry."""
        if status not in STORED_STATUSES:
            await self.release(claim)
            return
        record = orjson.dumps(
            {"state": "done", "fp": claim.fingerprint, "status": status, "body": base64.b64encode(body).decode()}
        )
        give_up = time.monotonic() + STORE_SECONDS
        for attempt in itertools.count():
            try:
                await self._redis.set(claim.redis_key, record, ex=self._ttl)
                return
            except RedisError as exc:
                pause = STORE_BACKOFF[min(attempt, len(STORE_BACKOFF) - 1)]
                if time.monotonic() + pause >= give_up:
                    # The events are in Kafka; a retry with this key after the claim expires
                    # writes them again, and the derived event ids let de-duplication catch it.
                    metrics.idempotency_store_failures.inc()
                    log.warning("the answer for an Idempotency-Key could not be stored (%s)", type(exc).__name__)
                    return
                await asyncio.sleep(pause)

    async def release(self, claim: Claim) -> None:
        try:
            await self._redis.eval(_RELEASE, 1, claim.redis_key, claim.token)
        except RedisError:
            return  # the claim expires by itself after lock_seconds

    def _unavailable(self, exc: Exception | None) -> Unavailable:
        why = f" ({type(exc).__name__})" if exc else ""
        return Unavailable(
            f"the idempotency store cannot be reached{why}; retry shortly", retry_after=self._retry_after
        )
