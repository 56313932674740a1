"""API keys and scopes: who is calling, and what they may do."""

from __future__ import annotations

from dataclasses import dataclass

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
