"""API keys and scopes: who is calling, and what they may do.

A key is `tally_<id>_<secret>`: a short public id and 32 random bytes (url-safe
base64). Postgres keeps the id and a SHA-256 of the secret, never the secret. Pure
parts (format, parsing, hashing, scope rules, the header) come first; the I/O edge
(`KeyStore`, its cache, the FastAPI dependency `require_scope`) follows.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import MetaData, Row, func, insert, select, update
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

from core import metrics
from core.db import read_engine
from core.health import postgres_ok
from core.problems import Forbidden, Unauthorized, Unavailable
from core.settings import Settings, SettingsError
from schemas.api import Problem
from schemas.tables import api_keys_table

log = logging.getLogger(__name__)
K = TypeVar("K")
V = TypeVar("V")

SCOPES = ("ingest", "query", "admin")


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request, put in the request state as `principal` by authentication.

    `key_id` is "anonymous" when auth is off. `rate_limit` is the key's own events/s
    limit for ingest, or None for the configured default.
    """

    key_id: str
    name: str
    scopes: frozenset[str]
    rate_limit: int | None = None


ANONYMOUS = Principal("anonymous", "anonymous", frozenset(SCOPES))


# --- Pure parts: the key format, hashing, scopes, the Authorization header. ---

KEY_PREFIX = "tally"
ID_BYTES = 6  # 12 hex characters: a short public id
SECRET_BYTES = 32  # 256 bits from `secrets`: 43 url-safe base64 characters
_ID_CHARS = ID_BYTES * 2
_SECRET_CHARS = (SECRET_BYTES * 4 + 2) // 3
_KEY = re.compile(rf"{KEY_PREFIX}_([0-9a-f]{{{_ID_CHARS}}})_([A-Za-z0-9_-]{{{_SECRET_CHARS}}})")

Reason = Literal["missing", "malformed", "unknown", "revoked", "scope", "unavailable"]


class AuthError(Exception):
    """Authentication refused; `reason` labels `tally_auth_failures_total`."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason: Reason = reason
        self.detail = detail


def new_key_id() -> str:
    return secrets.token_hex(ID_BYTES)


def new_secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(SECRET_BYTES)).rstrip(b"=").decode("ascii")


def format_key(key_id: str, secret: str) -> str:
    """The full key a client sends: `tally_<id>_<secret>`."""
    return f"{KEY_PREFIX}_{key_id}_{secret}"


def parse_key(token: str) -> tuple[str, str]:
    """(id, secret) of a well-formed key; AuthError("malformed") otherwise.

    The id is hex and so never contains the `_` that url-safe base64 may put in the secret.
    """
    match = _KEY.fullmatch(token)
    if match is None:
        raise AuthError("malformed", f"the API key is malformed: expected {KEY_PREFIX}_<id>_<secret>")
    return match.group(1), match.group(2)


def hash_secret(secret: str) -> bytes:
    """SHA-256 of the secret: a fast hash is right for 256 random bits (see `api_keys_table`)."""
    return hashlib.sha256(secret.encode("ascii")).digest()


def secret_matches(secret: str, stored_hash: bytes) -> bool:
    """Constant-time comparison, so response timing does not leak how much of a hash matched."""
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def has_scope(scopes: Iterable[str], scope: str) -> bool:
    """`admin` implies every scope."""
    granted = set(scopes)
    return scope in granted or "admin" in granted


def validate_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Known scopes, de-duplicated and in SCOPES order; ValueError names unknown ones."""
    wanted = set(scopes)
    unknown = sorted(wanted - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(SCOPES)}")
    if not wanted:
        raise ValueError(f"a key needs at least one scope of {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in wanted)


def bearer_token(header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive)."""
    if header is None or not header.strip():
        raise AuthError("missing", "missing credentials: send `Authorization: Bearer <API key>`")
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise AuthError("malformed", "the Authorization header must be `Bearer <API key>`")
    return parts[1]


def check_scope(principal: Principal, scope: str) -> None:
    """Forbidden naming the missing scope, unless the principal has it (or `admin`)."""
    if not has_scope(principal.scopes, scope):
        has = ", ".join(s for s in SCOPES if s in principal.scopes) or "none"
        raise Forbidden(
            f"the API key {principal.key_id} lacks the `{scope}` scope (it has: {has})",
            headers={"WWW-Authenticate": f'Bearer realm="tally", error="insufficient_scope", scope="{scope}"'},
        )


class TtlCache(Generic[K, V]):
    """A small in-process map whose entries expire; the oldest entry goes when it is full."""

    def __init__(self, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._max = max_entries
        self._clock = clock

    def get(self, key: K) -> tuple[V] | None:
        """`(value,)` while fresh (the value itself may be None), else None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        return (value,)

    def put(self, key: K, value: V, ttl: float) -> None:
        if ttl <= 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = (self._clock() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


# --- I/O: keys in Postgres, a cache in front, the FastAPI dependency. ---


class KeysNotMigrated(SettingsError):
    def __init__(self) -> None:
        super().__init__("the tally_api_keys table does not exist in this database: run `tally migrate` first")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key as operators see it: never the secret, never its hash."""

    id: str
    name: str
    scopes: tuple[str, ...]
    rate_limit: int | None
    created_at: datetime
    revoked_at: datetime | None

    def principal(self) -> Principal:
        return Principal(self.id, self.name, frozenset(self.scopes), self.rate_limit)


@dataclass(frozen=True, slots=True)
class _Stored:
    key: ApiKey
    secret_hash: bytes


NEGATIVE_CACHE_SECONDS = 2.0  # how long an id that is not in the table is remembered
AUTH_POOL_SIZE = 2  # connections per process for key lookups (a cache miss is one short query)
AUTH_STATEMENT_TIMEOUT_MS = 2_000
UNDEFINED_TABLE = "42P01"  # Postgres SQLSTATE: the table does not exist (not migrated)


class KeyStore:
    """API keys in `tally_api_keys`, verified through an in-process TTL cache.

    A verified key (or a revoked one) is remembered for `cache_seconds`, so the ingest
    hot path does not ask Postgres on every request: a key revoked elsewhere keeps
    working in a process for at most that long. An id that is not in the table is
    remembered for at most NEGATIVE_CACHE_SECONDS, and concurrent lookups of one id
    share a single query, so a flood of a bad key does not become a flood of queries.
    Malformed keys and wrong secrets of a cached id never reach Postgres.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        cache_seconds: float = 10.0,
        max_cached: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.cache_seconds = cache_seconds
        self._table = api_keys_table(MetaData())
        self._cache: TtlCache[str, _Stored | None] = TtlCache(max_cached, clock)
        self._inflight: dict[str, asyncio.Task[_Stored | None]] = {}

    async def create(self, name: str, scopes: Iterable[str], *, rate_limit: int | None = None) -> tuple[ApiKey, str]:
        """A new key: (what is stored, the full key). The full key exists only in this return value."""
        name = name.strip()
        if not name or len(name) > 200:
            raise ValueError("a key needs a name of 1 to 200 characters")
        granted = validate_scopes(scopes)
        if rate_limit is not None and rate_limit < 1:
            raise ValueError("rate limit must be a positive number of events per second")
        key_id, secret = new_key_id(), new_secret()
        t = self._table
        values = {"id": key_id, "name": name, "secret_hash": hash_secret(secret), "scopes": list(granted)}
        async with self._errors(), self.engine.begin() as conn:
            created_at = (
                await conn.execute(insert(t).values(**values, rate_limit=rate_limit).returning(t.c.created_at))
            ).scalar_one()
        return ApiKey(key_id, name, granted, rate_limit, created_at, None), format_key(key_id, secret)

    async def list(self) -> Sequence[ApiKey]:
        """Every key, oldest first, revoked ones included."""
        t = self._table
        async with self._errors(), self.engine.connect() as conn:
            rows = (await conn.execute(select(t).order_by(t.c.created_at, t.c.id))).all()
        return [_api_key(row) for row in rows]

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Mark a key revoked (an already revoked key keeps its first time); None if there is no such key."""
        t = self._table
        statement = (
            update(t)
            .where(t.c.id == key_id)
            .values(revoked_at=func.coalesce(t.c.revoked_at, func.now()))
            .returning(*t.c)
        )
        async with self._errors(), self.engine.begin() as conn:
            row = (await conn.execute(statement)).one_or_none()
        self._cache.discard(key_id)
        return None if row is None else _api_key(row)

    async def verify(self, token: str) -> Principal:
        """The Principal of a valid, unrevoked key; AuthError otherwise.

        Database failures propagate (the caller answers 503: an unreachable store is
        not an unknown key).
        """
        key_id, secret = parse_key(token)
        stored = await self._lookup(key_id)
        if stored is None or not secret_matches(secret, stored.secret_hash):
            raise AuthError("unknown", "unknown or invalid API key")
        if stored.key.revoked_at is not None:
            raise AuthError("revoked", f"the API key {key_id} has been revoked")
        return stored.key.principal()

    async def reachable(self) -> bool:
        return await postgres_ok(self.engine)

    async def close(self) -> None:
        """Dispose of the engine (the store owns it)."""
        await self.engine.dispose()

    async def _lookup(self, key_id: str) -> _Stored | None:
        cached = self._cache.get(key_id)
        if cached is not None:
            return cached[0]
        task = self._inflight.get(key_id)
        if task is None:
            task = asyncio.create_task(self._fetch(key_id), name=f"tally-auth-lookup-{key_id}")
            self._inflight[key_id] = task
            task.add_done_callback(partial(self._fetched, key_id))
        # shield: one caller giving up (a client disconnect) does not cancel the others' lookup
        return await asyncio.shield(task)

    def _fetched(self, key_id: str, task: asyncio.Task[_Stored | None]) -> None:
        self._inflight.pop(key_id, None)
        if task.cancelled() or task.exception() is not None:  # .exception() also marks it retrieved
            return
        stored = task.result()
        ttl = self.cache_seconds if stored is not None else min(self.cache_seconds, NEGATIVE_CACHE_SECONDS)
        self._cache.put(key_id, stored, ttl)

    async def _fetch(self, key_id: str) -> _Stored | None:
        t = self._table
        async with self._errors(), self.engine.connect() as conn:
            row = (await conn.execute(select(t).where(t.c.id == key_id))).one_or_none()
        return None if row is None else _Stored(_api_key(row), bytes(row.secret_hash))

    @staticmethod
    @asynccontextmanager
    async def _errors() -> AsyncIterator[None]:
        try:
            yield
        except ProgrammingError as exc:
            if getattr(exc.orig, "sqlstate", None) == UNDEFINED_TABLE:
                raise KeysNotMigrated() from exc
            raise


def _api_key(row: Row[Any]) -> ApiKey:
    return ApiKey(row.id, row.name, tuple(row.scopes), row.rate_limit, row.created_at, row.revoked_at)


def open_key_store(settings: Settings, *, app: str) -> KeyStore | None:
    """For a lifespan: a KeyStore on a small read-only pool of its own, or None when auth is off.

    Nothing connects here; the lifespan closes the store on the way out.
    """
    if not settings.auth:
        if settings.env == "prod":
            log.warning("%s: auth is off (TALLY_AUTH=false): anyone who can reach it may call every route", app)
        return None
    settings.require("postgres_url")
    engine = read_engine(
        str(settings.postgres_url),
        pool_size=AUTH_POOL_SIZE,
        statement_timeout_ms=AUTH_STATEMENT_TIMEOUT_MS,
        app=f"{app}-auth",
    )
    return KeyStore(engine, cache_seconds=settings.auth_cache_seconds)


def auth_requires(settings: Settings) -> tuple[str, ...]:
    """The settings a service needs for auth: Postgres (where keys live) when auth is on."""
    return ("postgres_url",) if settings.auth else ()


bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="A Tally API key from `tally keys create`: `Authorization: Bearer tally_<id>_<secret>`. "
    "Scopes: `ingest` for POST /v1/events, `query` for /v1/rollups and /v1/ops/lag; `admin` implies both.",
)


def auth_responses(scope: str) -> dict[int | str, dict[str, Any]]:
    """The 401 and 403 answers of routes behind `require_scope(scope)`, for OpenAPI."""
    content: dict[str, Any] = {"application/problem+json": {}}
    return {
        401: {
            "model": Problem,
            "content": content,
            "description": "No API key, or a malformed, unknown or revoked one (`WWW-Authenticate: Bearer`).",
        },
        403: {
            "model": Problem,
            "content": content,
            "description": f"The API key lacks the `{scope}` scope (`admin` implies every scope).",
        },
    }


def require_scope(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency: the caller must present an API key with `scope` (or `admin`).

    It stores the caller's Principal in `request.scope["state"]["principal"]` (also
    `request.state.principal`) and returns it. With `settings.auth` off the Principal is
    ANONYMOUS. Otherwise: 401 (with `WWW-Authenticate: Bearer`) when the key is missing,
    malformed, unknown or revoked; 403 naming the scope when the key lacks it; 503 when
    the key store cannot be reached. The KeyStore comes from the lifespan state: a service
    with auth yields `"keys": open_key_store(settings, app=...)` beside `"settings"`.
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; known: {', '.join(SCOPES)}")

    async def authenticate(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    ) -> Principal:
        state: dict[str, Any] = request.scope.setdefault("state", {})
        return await authorize(state, request.headers.get("authorization"), scope)

    return authenticate


async def authorize(state: dict[str, Any], authorization: str | None, scope: str) -> Principal:
    """`require_scope`'s check without FastAPI: for a plain ASGI route, given the request's
    lifespan state and its Authorization header. Stores the Principal in `state["principal"]`."""
    settings: Settings = state["settings"]
    if not settings.auth:
        principal = ANONYMOUS
    else:
        keys: KeyStore | None = state.get("keys")
        if keys is None:  # fail closed: a lifespan without a KeyStore is a bug, not an open door
            raise RuntimeError("auth is on but the app's lifespan state has no KeyStore under `keys`")
        principal = await _verify(keys, authorization, settings)
        try:
            check_scope(principal, scope)
        except Forbidden:
            metrics.auth_failures.labels("scope").inc()
            raise
    state["principal"] = principal
    return principal


async def _verify(keys: KeyStore, header: str | None, settings: Settings) -> Principal:
    try:
        return await keys.verify(bearer_token(header))
    except AuthError as exc:
        metrics.auth_failures.labels(exc.reason).inc()
        challenge = 'Bearer realm="tally"'
        if exc.reason != "missing":  # RFC 6750 §3.1: no error code when no credentials were sent
            challenge += ', error="invalid_token"'
        raise Unauthorized(exc.detail, challenge=challenge) from None
    except Exception as exc:
        metrics.auth_failures.labels("unavailable").inc()
        log.warning("cannot verify an API key: %s", exc, exc_info=not isinstance(exc, KeysNotMigrated))
        raise Unavailable(
            "cannot verify the API key now: the key store is unreachable", retry_after=settings.retry_after_seconds
        ) from None
