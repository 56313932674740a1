"""API keys over real HTTP and a real Postgres: every route of both apps is checked, the public ones stay open.

Routes are enumerated from `app.routes` (every kind: FastAPI routes, the docs pages,
mounts; see tests/security/support.py), so a route added later is checked for its
scope, or must be declared public there with the reason, without touching this file.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from prometheus_client import REGISTRY
from sqlalchemy import event
from sqlalchemy.engine import make_url

from core import devstack
from core.auth import (
    AuthError,
    KeysNotMigrated,
    KeyStore,
    Principal,
    format_key,
    new_key_id,
    new_secret,
    open_key_store,
    require_scope,
)
from core.db import read_engine, write_engine
from core.problems import install_problem_handlers
from core.settings import Settings
from ingest.app import create_app as ingest_app
from query.app import create_app as query_app
from tests.conftest import serve
from tests.security.support import PUBLIC, protected_routes, public_paths, public_routes

pytestmark = pytest.mark.integration

SCOPE_OF = {"ingest": "ingest", "query": "query"}  # the scope every other route of each app needs
CACHE_SECONDS = 0.3


@dataclass
class Keys:
    ingest: str
    query: str  # created through `tally keys create`
    admin: str
    both: str
    revoked: str
    unknown: str  # well-formed, never stored
    wrong_secret: str  # a stored id with another secret


def failures(reason: str) -> float:
    return REGISTRY.get_sample_value("tally_auth_failures_total", {"reason": reason}) or 0.0


def cli_env(settings: Settings) -> dict[str, str]:
    return settings.process_env()


async def tally(settings: Settings, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "core.cli", *args, env=cli_env(settings),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def key_from_cli(stdout: str) -> tuple[str, str]:
    fields = dict(line.split(maxsplit=1) for line in stdout.splitlines() if line.strip())
    return fields["id"], fields["key"]


@pytest.fixture
def auth_settings(migrated: Settings) -> Settings:
    return migrated.model_copy(update={"auth": True, "auth_cache_seconds": CACHE_SECONDS})


@pytest.fixture
async def store(auth_settings: Settings) -> AsyncIterator[KeyStore]:
    keys = KeyStore(write_engine(str(auth_settings.postgres_url), pool_size=1), cache_seconds=0)
    yield keys
    await keys.close()


@pytest.fixture
async def keys(auth_settings: Settings, store: KeyStore) -> Keys:
    code, out, err = await tally(auth_settings, "keys", "create", "--name", "dashboard", "--scope", "query")
    assert code == 0, err
    assert "not shown again" in err
    _, query = key_from_cli(out)
    _, ingest = await store.create("producer", ["ingest"], rate_limit=500)
    _, admin = await store.create("ops", ["admin"])
    _, both = await store.create("both", ["ingest", "query"])
    revoked_key, revoked = await store.create("old", ["ingest", "query"])
    assert await store.revoke(revoked_key.id) is not None
    ingest_id = ingest.split("_")[1]
    return Keys(
        ingest=ingest, query=query, admin=admin, both=both, revoked=revoked,
        unknown=format_key(new_key_id(), new_secret()), wrong_secret=format_key(ingest_id, new_secret()),
    )


async def call(http: httpx.AsyncClient, method: str, path: str, key: str | None = None,
               header: str | None = None) -> httpx.Response:
    headers = {}
    if header is not None:
        headers["authorization"] = header
    elif key is not None:
        headers["authorization"] = f"Bearer {key}"
    body = None if method == "GET" else {"events": [{"type": "auth_check"}]}
    return await http.request(method, path, headers=headers, json=body)


def assert_401(r: httpx.Response, words: str, *, error: bool = True) -> None:
    assert r.status_code == 401, (r.request.url, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert ('error="invalid_token"' in challenge) is error
    problem = r.json()
    assert problem["status"] == 401 and problem["title"] == "Unauthorized"
    assert words in problem["detail"]
    assert problem["instance"] == r.request.url.path


async def test_every_route_needs_a_key_with_its_scope(auth_settings: Settings, keys: Keys) -> None:
    apps = {"ingest": ingest_app(auth_settings), "query": query_app(auth_settings)}
    wrong = {"ingest": keys.query, "query": keys.ingest}
    right = {"ingest": keys.ingest, "query": keys.query}
    before = {r: failures(r) for r in ("missing", "malformed", "unknown", "revoked", "scope")}
    checked = 0
    async with AsyncExitStack() as stack:
        for name, app in apps.items():
            url = await stack.enter_async_context(serve(app))
            http = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=30))
            assert public_paths(app) == set(public_routes(name)), name  # exactly these: a stale entry fails too
            routes = protected_routes(app)
            assert routes, name
            scope = SCOPE_OF[name]
            for method, path in routes:
                assert_401(await call(http, method, path), "missing credentials", error=False)
                for header in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "Bearer not-a-key"):
                    assert_401(await call(http, method, path, header=header), "")
                assert_401(await call(http, method, path, header="Token x"), "must be `Bearer <API key>`")
                assert_401(await call(http, method, path, keys.unknown), "unknown or invalid API key")
                assert_401(await call(http, method, path, keys.wrong_secret), "unknown or invalid API key")
                assert_401(await call(http, method, path, keys.revoked), "has been revoked")

                r = await call(http, method, path, wrong[name])
                assert r.status_code == 403, (path, r.text)
                assert r.headers["content-type"] == "application/problem+json"
                assert f"lacks the `{scope}` scope" in r.json()["detail"]
                assert f'scope="{scope}"' in r.headers["www-authenticate"]

                for key in (right[name], keys.admin, keys.both):
                    r = await call(http, method, path, key)
                    assert r.status_code not in (401, 403), (path, r.text)
                    if path == "/v1/rollups":
                        assert r.status_code == 200
                # The scheme is case-insensitive (RFC 9110 §11.1).
                r = await call(http, method, path, header=f"bearer {right[name]}")
                assert r.status_code not in (401, 403)
                checked += 1

            for path in public_routes(name):
                r = await http.get(path)
                assert r.status_code not in (401, 403), (name, path)
                if path != "/readyz":
                    assert r.status_code == 200, (name, path, r.text)
    assert checked == 5  # POST /v1/events; GET /v1/rollups, /v1/rollups/{name}, /v1/ops/lag, /v1/ops/counters
    after = {r: failures(r) for r in before}
    assert after["missing"] - before["missing"] == checked
    assert after["malformed"] - before["malformed"] == 5 * checked
    assert after["unknown"] - before["unknown"] == 2 * checked
    assert after["revoked"] - before["revoked"] == checked
    assert after["scope"] - before["scope"] == checked


async def test_openapi_documents_the_bearer_scheme(auth_settings: Settings) -> None:
    for app, scope in ((ingest_app(auth_settings), "ingest"), (query_app(auth_settings), "query")):
        spec = app.openapi()
        scheme = spec["components"]["securitySchemes"]["ApiKey"]
        assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
        assert "tally keys create" in scheme["description"]
        for path, operations in spec["paths"].items():
            for operation in operations.values():
                if path in PUBLIC:
                    assert "security" not in operation, path
                else:
                    assert operation["security"] == [{"ApiKey": []}], path
                    assert {"401", "403"} <= set(operation["responses"]), path
                    forbidden = operation["responses"]["403"]["description"]
                    assert f"`{scope}`" in forbidden or forbidden == "Forbidden", path  # a route may restate 403


async def test_a_revoked_key_stops_working_within_the_cache_time(auth_settings: Settings, store: KeyStore) -> None:
    key, token = await store.create("soon revoked", ["query"])
    async with serve(query_app(auth_settings)) as url, httpx.AsyncClient(base_url=url) as http:
        headers = {"authorization": f"Bearer {token}"}
        assert (await http.get("/v1/rollups", headers=headers)).status_code == 200
        code, out, err = await tally(auth_settings, "keys", "revoke", key.id)
        assert code == 0, err
        assert f"revoked {key.id}" in out
        revoked_at = time.monotonic()
        while (r := await http.get("/v1/rollups", headers=headers)).status_code == 200:
            assert time.monotonic() - revoked_at < CACHE_SECONDS + 1.0, "still accepted after the cache time"
            await asyncio.sleep(0.02)
        assert_401(r, "has been revoked")


def app_with(settings: Settings) -> FastAPI:
    """A minimal service with one route behind require_scope("ingest"), reporting its Principal."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        keys = open_key_store(settings, app="tally-test")
        yield {"settings": settings, "keys": keys}
        if keys is not None:
            await keys.close()

    app = FastAPI(lifespan=lifespan)
    install_problem_handlers(app)

    @app.get("/who", dependencies=[Depends(require_scope("ingest"))])
    async def who(request: Request) -> dict[str, Any]:
        p: Principal = request.scope["state"]["principal"]
        assert request.state.principal is p
        return {"key_id": p.key_id, "name": p.name, "scopes": sorted(p.scopes), "rate_limit": p.rate_limit}

    return app


async def test_the_dependency_puts_the_principal_in_the_request_state(auth_settings: Settings, store: KeyStore) -> None:
    stored, token = await store.create("limited", ["ingest"], rate_limit=42)
    async with serve(app_with(auth_settings)) as url, httpx.AsyncClient(base_url=url) as http:
        r = await http.get("/who", headers={"authorization": f"Bearer {token}"})
    assert r.json() == {"key_id": stored.id, "name": "limited", "scopes": ["ingest"], "rate_limit": 42}

    off = auth_settings.model_copy(update={"auth": False, "postgres_url": None})
    async with serve(app_with(off)) as url, httpx.AsyncClient(base_url=url) as http:
        r = await http.get("/who")
    assert r.json() == {"key_id": "anonymous", "name": "anonymous", "scopes": ["admin", "ingest", "query"],
                        "rate_limit": None}


async def test_an_unreachable_key_store_is_a_503_not_a_401(auth_settings: Settings) -> None:
    dead = make_url(str(auth_settings.postgres_url)).set(port=devstack.free_port())
    down = auth_settings.model_copy(update={"postgres_url": dead.render_as_string(hide_password=False)})
    before = failures("unavailable")
    async with serve(app_with(down)) as url, httpx.AsyncClient(base_url=url) as http:
        r = await http.get("/who", headers={"authorization": f"Bearer {format_key(new_key_id(), new_secret())}"})
        assert r.status_code == 503, r.text
        assert r.headers["content-type"] == "application/problem+json" and r.headers["retry-after"]
        assert "cannot verify the API key" in r.json()["detail"]
        assert_401(await http.get("/who", headers={"authorization": "Bearer nope"}), "")  # no lookup needed
    assert failures("unavailable") == before + 1


async def test_cache_spares_postgres_for_hot_and_bad_keys(auth_settings: Settings, store: KeyStore) -> None:
    _, token = await store.create("hot", ["ingest"])
    engine = read_engine(str(auth_settings.postgres_url), pool_size=2, statement_timeout_ms=2000)
    queries: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: queries.append(statement))
    keys = KeyStore(engine, cache_seconds=10)
    try:
        principals = await asyncio.gather(*(keys.verify(token) for _ in range(50)))
        assert {p.key_id for p in principals} == {token.split("_")[1]}
        assert len(queries) == 1  # concurrent lookups of one id share a query; later ones hit the cache
        for _ in range(20):
            await keys.verify(token)
        assert len(queries) == 1

        unknown = format_key(new_key_id(), new_secret())
        results = await asyncio.gather(*(keys.verify(unknown) for _ in range(50)), return_exceptions=True)
        assert all(isinstance(e, AuthError) and e.reason == "unknown" for e in results)
        for _ in range(20):
            with pytest.raises(AuthError):
                await keys.verify(unknown)
        assert len(queries) == 2  # the negative answer is cached too

        for bad in ("tally_nope", format_key(token.split("_")[1], new_secret())):
            with pytest.raises(AuthError):
                await keys.verify(bad)  # malformed, or a wrong secret for a cached id: no query
        assert len(queries) == 2
    finally:
        await keys.close()


async def test_keys_cli_create_list_revoke_never_shows_a_secret(auth_settings: Settings) -> None:
    code, out, _ = await tally(auth_settings, "keys", "create", "--name", "etl job", "--scope", "ingest",
                               "--scope", "query", "--rate-limit", "250")
    assert code == 0
    key_id, token = key_from_cli(out)
    secret = token.split("_", 2)[2]
    assert token == f"tally_{key_id}_{secret}"

    code, listing, _ = await tally(auth_settings, "keys", "list")
    assert code == 0
    lines = listing.splitlines()
    assert lines[0].split() == ["ID", "NAME", "SCOPES", "RATE", "LIMIT", "CREATED", "REVOKED"]
    row = next(line for line in lines if line.startswith(key_id))
    assert "etl job" in row and "ingest,query" in row and "250/s" in row and row.rstrip().endswith("-")
    assert secret not in listing and token not in listing

    assert (await tally(auth_settings, "keys", "revoke", key_id))[0] == 0
    code, listing, _ = await tally(auth_settings, "keys", "list")
    row = next(line for line in listing.splitlines() if line.startswith(key_id))
    assert not row.rstrip().endswith("-")  # a revoked time
    assert secret not in listing

    code, _, err = await tally(auth_settings, "keys", "revoke", "000000000000")
    assert code == 1 and "no API key" in err
    code, _, err = await tally(auth_settings, "keys", "create", "--name", "x", "--scope", "write")
    assert code == 2 and "invalid choice" in err
    code, _, err = await tally(auth_settings, "keys", "create", "--name", "x", "--scope", "ingest", "--rate-limit", "0")
    assert code == 1 and "rate limit" in err


async def test_keys_need_the_migrated_table(settings: Settings) -> None:
    code, _, err = await tally(settings, "keys", "list")
    assert code == 1 and "run `tally migrate`" in err
    keys = KeyStore(write_engine(str(settings.postgres_url), pool_size=1), cache_seconds=0)
    try:
        with pytest.raises(KeysNotMigrated):
            await keys.create("x", ["ingest"])
    finally:
        await keys.close()


async def test_ingest_needs_postgres_only_with_auth(auth_settings: Settings) -> None:
    no_pg = auth_settings.model_copy(update={"postgres_url": None})
    code, _, err = await tally(no_pg, "ingest")
    assert code == 1 and "TALLY_POSTGRES_URL" in err
