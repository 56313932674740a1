"""`tally keys create|list|revoke`: manage API keys in Postgres.

The full key is printed once, by `create`; Postgres keeps only a SHA-256 of its
secret, so a lost key cannot be shown again, only revoked and replaced.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from core.auth import ApiKey, KeyStore
from core.db import write_engine
from core.settings import Settings


class UnknownKey(LookupError):
    """No API key has the id given to `tally keys revoke`."""


def _time(value: datetime | None) -> str:
    return "-" if value is None else f"{value.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"


def _rate(value: int | None) -> str:
    return "default" if value is None else f"{value}/s"


def format_keys(keys: Sequence[ApiKey]) -> str:
    """A table of keys: id, name, scopes, rate limit, created, revoked. Never a secret or hash."""
    header = ("ID", "NAME", "SCOPES", "RATE LIMIT", "CREATED", "REVOKED")
    rows = [header] + [
        (k.id, k.name, ",".join(k.scopes), _rate(k.rate_limit), _time(k.created_at), _time(k.revoked_at)) for k in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _store(settings: Settings) -> KeyStore:
    settings.require("postgres_url")
    return KeyStore(write_engine(str(settings.postgres_url), pool_size=1, app="tally-keys"), cache_seconds=0)


async def create(settings: Settings, name: str, scopes: Sequence[str], rate_limit: int | None) -> None:
    store = _store(settings)
    try:
        key, full = await store.create(name, scopes, rate_limit=rate_limit)
    finally:
        await store.close()
    print(f"id      {key.id}")
    print(f"name    {key.name}")
    print(f"scopes  {','.join(key.scopes)}")
    print(f"rate    {_rate(key.rate_limit)}")
    print(f"key     {full}")
    print("Store the key now: it is not shown again (Tally keeps only a hash of it).", file=sys.stderr)


async def list_keys(settings: Settings) -> None:
    store = _store(settings)
    try:
        keys = await store.list()
    finally:
        await store.close()
    print(format_keys(keys))


async def revoke(settings: Settings, key_id: str) -> None:
    store = _store(settings)
    try:
        key = await store.revoke(key_id)
    finally:
        await store.close()
    if key is None:
        raise UnknownKey(f"no API key with id {key_id!r} (see `tally keys list`)")
    print(
        f"revoked {key.id} ({key.name}) at {_time(key.revoked_at)}; "
        f"running services stop accepting it within TALLY_AUTH_CACHE_SECONDS ({settings.auth_cache_seconds:g} s)"
    )
