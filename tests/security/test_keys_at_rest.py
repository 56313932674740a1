"""API keys at rest: Postgres holds each key's public id and a SHA-256 of its secret, nothing reversible.

Keys are made the two ways operators make them (`tally keys create`, and KeyStore.create
as the CLI does), one is revoked, then the key table and every other table of the
database are read directly and searched for the secret in every encoding a careless
change might store it in (plain, the whole key, its raw bytes as hex or base64).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sys
from collections.abc import Iterator
from datetime import datetime

import asyncpg
import pytest

from core.auth import AuthError, KeyStore, parse_key
from core.db import write_engine
from core.settings import Settings

pytestmark = pytest.mark.integration

# A new column on the key table is reviewed here: it must not hold anything derived from the secret.
COLUMNS = {"id", "name", "secret_hash", "scopes", "rate_limit", "created_at", "revoked_at"}


async def cli(settings: Settings, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "core.cli", *args, env=settings.process_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


def encodings(token: str) -> Iterator[bytes]:
    """The forms in which a key's secret could be stored and read back."""
    _, secret = parse_key(token)
    raw = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    assert len(raw) == 32
    yield token.encode()
    yield secret.encode()
    yield raw
    yield raw.hex().encode()
    yield raw.hex().upper().encode()
    yield base64.b64encode(raw)
    yield base64.b64encode(raw).rstrip(b"=")
    yield base64.urlsafe_b64encode(raw)
    yield secret[::-1].encode()


def as_bytes(value: object) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, list):
        return b"\0".join(as_bytes(v) for v in value)
    if value is None or isinstance(value, int | datetime):
        return str(value).encode()
    assert isinstance(value, str), type(value)
    return value.encode()


async def test_only_a_sha256_of_each_secret_is_stored(migrated: Settings) -> None:
    tokens = []
    out = await cli(migrated, "keys", "create", "--name", "cli dashboard", "--scope", "query")
    tokens.append(dict(line.split(maxsplit=1) for line in out.splitlines() if line.strip())["key"])
    store = KeyStore(write_engine(str(migrated.postgres_url), pool_size=1), cache_seconds=0)
    try:
        for name, scopes in (("producer", ["ingest"]), ("ops", ["admin"]), ("to revoke", ["ingest", "query"])):
            _, token = await store.create(name, scopes, rate_limit=100)
            tokens.append(token)
        assert await store.revoke(parse_key(tokens[-1])[0]) is not None
        for token in tokens[:-1]:  # the stored hash is all verification needs
            assert (await store.verify(token)).key_id == parse_key(token)[0]
        with pytest.raises(AuthError, match="revoked"):
            await store.verify(tokens[-1])
    finally:
        await store.close()
    assert len({parse_key(t)[1] for t in tokens}) == len(tokens)

    conn = await asyncpg.connect(str(migrated.postgres_url))
    try:
        columns = {r["column_name"] for r in await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'tally_api_keys'")}
        rows = {r["id"]: dict(r) for r in await conn.fetch("SELECT * FROM tally_api_keys")}
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')")
        dump = b"\n".join([
            (r[0] or "").encode()
            for t in tables
            for r in await conn.fetch(f'SELECT t::text FROM "{t["table_schema"]}"."{t["table_name"]}" AS t')
        ])
    finally:
        await conn.close()

    assert columns == COLUMNS
    assert len(rows) == len(tokens)
    assert "tally_api_keys" in {t["table_name"] for t in tables}
    for token in tokens:
        key_id, secret = parse_key(token)
        row = rows[key_id]
        assert bytes(row["secret_hash"]) == hashlib.sha256(secret.encode("ascii")).digest()  # one-way, 32 bytes
        stored = b"\0".join(as_bytes(v) for v in row.values())
        for form in encodings(token):
            assert form not in stored, (key_id, form)
            assert form not in dump, (key_id, form)  # nowhere in the database either
        assert bytes(row["secret_hash"]).hex().encode() in dump  # the dump really holds the key rows

    listing = await cli(migrated, "keys", "list")
    for token in tokens:
        key_id, _ = parse_key(token)
        assert key_id in listing
        assert all(form.decode("latin-1") not in listing for form in encodings(token))
        assert bytes(rows[key_id]["secret_hash"]).hex() not in listing  # not even the hash is shown
