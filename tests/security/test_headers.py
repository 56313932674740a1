"""Security headers on every response of both apps: successes, refusals, errors, 404s, 304s, streams, 500s.

The JSON APIs get `default-src 'none'`; the Swagger UI and ReDoc pages get a policy
that allows exactly what those pages load, which is checked against their own HTML, and
so does the console (this origin's files only: no inline script or style, no eval).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI

from core.auth import KeyStore
from core.db import write_engine
from core.settings import Settings
from ingest.app import create_app as ingest_app
from query.app import create_app as query_app
from tests.conftest import serve
from tests.integration.query_support import insert_rows, make_rows
from tests.security.support import Keys, make_keys, protected_routes, public_routes

pytestmark = pytest.mark.integration

COMMON = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-resource-policy": "same-origin",
}
API_CSP = "default-src 'none'; frame-ancestors 'none'"
DOCS = ("/docs", "/redoc", "/docs/oauth2-redirect")
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
ROLLUP = "/v1/rollups/events_by_type"
WHOLE = {"from": "2026-03-01T00:00:00Z", "to": "2026-05-01T00:00:00Z"}


def assert_secure(r: httpx.Response) -> None:
    where = (r.request.method, str(r.request.url), r.status_code)
    for name, value in COMMON.items():
        assert r.headers.get_list(name) == [value], (where, name)  # present once, with this value
    policy = r.headers.get_list("content-security-policy")
    assert len(policy) == 1, where
    if r.request.url.path in DOCS:
        assert "frame-ancestors 'none'" in policy[0] and policy[0] != API_CSP, where
    elif r.request.url.path == "/console" or r.request.url.path.startswith("/console/"):
        assert policy[0] == CONSOLE_CSP, where
    else:
        assert policy[0] == API_CSP, where
    assert len(r.headers.get_list("x-request-id")) == 1, where


async def boom() -> None:
    raise RuntimeError("a bug in a route")


@pytest.fixture
async def keys(migrated: Settings) -> AsyncIterator[tuple[Keys, str]]:
    store = KeyStore(write_engine(str(migrated.postgres_url), pool_size=1), cache_seconds=0)
    try:
        keys = await make_keys(store)
        _, slow = await store.create("slow", ["ingest"], rate_limit=1)
        yield keys, slow
    finally:
        await store.close()


async def ingest_responses(http: httpx.AsyncClient, keys: Keys, slow: str) -> list[httpx.Response]:
    auth = {"authorization": f"Bearer {keys.ingest}"}
    json_type = {**auth, "content-type": "application/json"}
    return [
        await http.post("/v1/events", json={"events": [{"type": "ok"}]}, headers=auth),  # 202
        await http.post("/v1/events", json=[{"type": "ok"}]),  # 401
        await http.post("/v1/events", json=[{"type": "ok"}], headers={"authorization": f"Bearer {keys.query}"}),
        await http.post("/v1/events", content=b"{not json", headers=json_type),  # 400
        await http.post("/v1/events", content=b"a,b", headers={**auth, "content-type": "text/csv"}),  # 415
        await http.post("/v1/events", content=b"[" + b" " * 3000 + b"]", headers=json_type),  # 413
        await http.post("/v1/events", json=[{"type": "not valid!"}], headers=auth),  # 422
        await http.post("/v1/events", json=[{"type": "a"}] * 5, headers={"authorization": f"Bearer {slow}"}),  # 429
        await http.get("/v1/events"),  # 405
        await http.get("/nowhere"),  # 404
        await http.head("/healthz"),
    ]


async def query_responses(http: httpx.AsyncClient, keys: Keys) -> list[httpx.Response]:
    auth = {"authorization": f"Bearer {keys.query}"}
    page = await http.get(ROLLUP, params=WHOLE, headers=auth)
    assert page.status_code == 200 and page.headers["etag"], (page.headers, page.text[:300])
    async with http.stream("GET", ROLLUP, params={**WHOLE, "format": "csv", "limit": "100"}, headers=auth) as stream:
        await stream.aread()
    assert stream.headers["x-cache"] == "stream"  # a streamed export, not a cached page
    return [
        page,
        stream,
        await http.get(ROLLUP, params=WHOLE, headers={**auth, "if-none-match": page.headers["etag"]}),  # 304
        await http.get(ROLLUP, params={**WHOLE, "format": "csv"}, headers=auth),
        await http.get("/v1/rollups", headers=auth),
        await http.get(ROLLUP, params={"granularity": "fortnight"}, headers=auth),  # 400
        await http.get("/v1/rollups/nope", headers=auth),  # 404 from the route
        await http.get(ROLLUP),  # 401
        await http.get(ROLLUP, headers={"authorization": f"Bearer {keys.ingest}"}),  # 403
        await http.get("/v1/ops/lag", headers={"authorization": f"Bearer {keys.admin}"}),
        await http.post("/v1/rollups", headers=auth),  # 405
        await http.get("/v1/nowhere"),  # 404 from the router
    ]


async def test_every_response_carries_the_security_headers(
    migrated: Settings, keys: tuple[Keys, str]
) -> None:
    await insert_rows(migrated, make_rows(n=40))
    on = migrated.model_copy(update={"auth": True, "max_body_bytes": 1000, "default_limit": 20, "max_limit": 20})
    apps: dict[str, FastAPI] = {"ingest": ingest_app(on), "query": query_app(on)}
    seen: dict[str, set[int]] = {}
    async with AsyncExitStack() as stack:
        for name, app in apps.items():
            app.add_api_route("/boom", boom)  # an exception in a route: a 500 from the middleware
            url = await stack.enter_async_context(serve(app))
            http = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=30))
            responses = [await http.get(path) for path in public_routes(name)]
            responses.append(await http.get("/boom"))
            responses += await (ingest_responses(http, *keys) if name == "ingest" else query_responses(http, keys[0]))
            no_key = [await http.request(method, path) for method, path in protected_routes(app)]
            for r in no_key:  # /boom is the one route added without auth
                assert r.status_code == (500 if r.request.url.path == "/boom" else 401), r.request.url
            for r in [*responses, *no_key]:
                assert_secure(r)
            seen[name] = {r.status_code for r in responses}
    assert seen["ingest"] >= {200, 202, 400, 401, 403, 404, 405, 413, 415, 422, 429, 500}, seen["ingest"]
    assert seen["query"] >= {200, 304, 400, 401, 403, 404, 405, 500}, seen["query"]


def directives(policy: str) -> dict[str, list[str]]:
    out = {}
    for part in policy.split(";"):
        name, *sources = part.split()
        out[name] = sources
    return out


def allowed(policy: dict[str, list[str]], directive: str, url: str) -> bool:
    sources = policy.get(directive, policy.get("default-src", []))
    parts = urlsplit(url)
    if not parts.scheme:
        return "'self'" in sources
    return f"{parts.scheme}://{parts.netloc}" in sources or f"{parts.scheme}:" in sources


async def test_the_docs_pages_may_load_what_they_need_and_nothing_else_may(settings: Settings) -> None:
    on = settings.model_copy(update={"auth": True})
    for app in (ingest_app(on), query_app(on)):
        async with serve(app) as url, httpx.AsyncClient(base_url=url) as http:
            spec = await http.get("/openapi.json")
            assert spec.headers["content-security-policy"] == API_CSP
            for path in DOCS:
                page = await http.get(path)
                assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
                assert_secure(page)
                policy = directives(page.headers["content-security-policy"])
                assert policy["default-src"] == ["'none'"] and policy["frame-ancestors"] == ["'none'"]
                html = page.text
                scripts = re.findall(r'<script[^>]*\bsrc="([^"]+)"', html)
                links = re.findall(r'<link[^>]*\bhref="([^"]+)"[^>]*>', html)
                for src in scripts:
                    assert allowed(policy, "script-src", src), (path, src)
                for tag in re.findall(r"<link[^>]*>", html):
                    href = re.search(r'href="([^"]+)"', tag)
                    assert href is not None
                    kind = "img-src" if "icon" in tag else "style-src"
                    assert allowed(policy, kind, href.group(1)), (path, tag)
                if re.search(r"<script>", html):  # an inline start-up script
                    assert "'unsafe-inline'" in policy["script-src"], path
                if "<style>" in html or 'style="' in html:
                    assert "'unsafe-inline'" in policy["style-src"], path
                if path != "/docs/oauth2-redirect":
                    assert "/openapi.json" in html and allowed(policy, "connect-src", "/openapi.json"), path
                    assert scripts and (links or path == "/redoc"), path  # the parser found the assets
                # What the pages do not need stays forbidden: other origins, plugins, frames, eval.
                assert not allowed(policy, "script-src", "https://evil.example/x.js"), path
                assert "'unsafe-eval'" not in policy.get("script-src", []), path
                assert policy.get("object-src", ["'none'"]) == ["'none'"], path
                assert policy.get("frame-src", ["'none'"]) == ["'none'"], path


async def test_the_console_loads_only_its_own_files(settings: Settings) -> None:
    """Every asset the page names is served here, under the console's policy, with its type; the
    page has no inline script or style (which that policy would block); the API stays `'none'`."""
    on = settings.model_copy(update={"auth": True})
    async with serve(query_app(on)) as url, httpx.AsyncClient(base_url=url) as http:
        redirect = await http.get("/console")
        assert redirect.status_code in (301, 307) and redirect.headers["location"].endswith("/console/")
        assert_secure(redirect)
        page = await http.get("/console/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert_secure(page)
        html = page.text
        assert "<script>" not in html and "<style" not in html and 'style="' not in html
        assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers either
        scripts = re.findall(r'<script[^>]*\bsrc="([^"]+)"', html)
        sheets = re.findall(r'<link rel="stylesheet" href="([^"]+)"', html)
        assert scripts == ["vendor/uplot/uPlot.iife.min.js", "console.js"]
        assert sheets == ["vendor/uplot/uPlot.min.css", "console.css"]
        for asset, kind in [*((s, "javascript") for s in scripts), *((s, "text/css") for s in sheets)]:
            r = await http.get(f"/console/{asset}")
            assert r.status_code == 200 and kind in r.headers["content-type"], asset
            assert_secure(r)
            assert "http://" not in r.text and "https://" not in r.text.replace("https://github.com/leeoniya/uPlot", "")
        for path in ("/console/nope.js", "/consoles"):  # the console's policy covers /console and below only
            missing = await http.get(path)
            assert missing.status_code == 404
            assert_secure(missing)
