"""Schemathesis against both apps' OpenAPI specs, each app a real `tally ingest` / `tally query`
process (uvicorn --factory over the app factory, httptools and uvloop as in production) with the
real Kafka, Postgres and Redis behind it: documented examples, positive and negative cases for
every operation, with auth off and with auth on and a valid key. The apps run in processes of
their own because Hypothesis, generating here, must be the only user of this process's `random`.

Every answer must be: no 5xx; a status code the spec documents; a content type the spec
documents for that status; a body that matches the documented schema; and every error an RFC
9457 problem (application/problem+json whose `status` is the HTTP status).

Not run: schemathesis' `positive_data_acceptance` and `negative_data_rejection`. The ingest
body schema is deliberately loose (a batch is accepted partly: invalid events are listed, not
refused), and the query parameters are strings whose grammar lives in `query.params`, so
"valid for the schema" is not "valid for the API" in either direction.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from core.auth import KeyStore
from core.db import write_engine
from core.settings import Settings
from tests.hostile.support import PROBLEM_JSON
from tests.integration.query_support import insert_rows, make_rows
from tests.processes import tally_process

pytestmark = pytest.mark.integration

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
EXAMPLES = {False: 25, True: 8}  # per operation and generation mode; auth on is a shorter second pass


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """The spec's NDJSON body is a string; negative cases send any other JSON value as one line."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")  # a lone surrogate makes an invalid line: refused
    return json.dumps(value).encode()


def problem_check(response: schemathesis.Response) -> str | None:
    """Errors are problem+json with a `status` equal to the HTTP status."""
    status = response.status_code
    if status < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]  # schemathesis keeps every value
    if content_type.split(";")[0].strip() != PROBLEM_JSON:
        return f"{status} answered as {content_type!r}: {response.content[:200]!r}"
    problem = orjson.loads(response.content)
    if problem.get("status") != status or not problem.get("title"):
        return f"{status} problem without a matching status or a title: {problem}"
    return None


@dataclass
class Seen:
    statuses: dict[int, int] = field(default_factory=dict)
    cases: int = 0


def jobs(schema: Any, spec: dict[str, Any], examples: int, names: dict[str, str]) -> list[tuple[str, Any, Any, int]]:
    """(label, operation, case strategy, examples) for every operation: its documented examples,
    positive and negative cases, and the same again with path parameters that exist (a random
    rollup name is a 404 before any query parameter is looked at)."""
    out: list[tuple[str, Any, Any, int]] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        raw = spec["paths"][operation.path][operation.method.lower()]
        if not (raw.get("parameters") or raw.get("requestBody")):
            out.append(("positive", operation, operation.as_strategy(), 1))  # nothing to vary or negate
            continue
        for i, strategy in enumerate(schema.get_strategies_from_examples(operation)):
            out.append((f"example {i}", operation, strategy, 3))
        real = {p["name"]: names[p["name"]] for p in raw.get("parameters", []) if p["in"] == "path"}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            out.append((mode.value, operation, operation.as_strategy(generation_mode=mode), examples))
            if real:
                strategy = operation.as_strategy(generation_mode=mode, path_parameters=real)
                out.append((f"{mode.value} {real}", operation, strategy, examples))
    return out


def fuzz(
    spec: dict[str, Any], url: str, headers: dict[str, str], examples: int, names: dict[str, str]
) -> tuple[list[str], Seen]:
    """Runs in a thread (schemathesis calls are blocking) while the app serves from the test's loop."""
    schema = schemathesis.openapi.from_dict(spec)
    failures: list[str] = []
    seen = Seen()
    for label, operation, strategy, count in jobs(schema, spec, examples, names):

        @hsettings(
            max_examples=count,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        @given(case=strategy)
        def run(case: schemathesis.Case) -> None:
            response = case.call(base_url=url, headers=headers, timeout=10)
            status = response.status_code
            seen.statuses[status] = seen.statuses.get(status, 0) + 1
            seen.cases += 1
            case.validate_response(response, checks=CHECKS, headers=headers)
            wrong = problem_check(response)
            assert wrong is None, f"{case.as_curl_command(headers=headers)}\n{wrong}"

        try:
            run()
        except Exception as exc:  # every operation runs; all failures are reported together
            causes = getattr(exc, "exceptions", ())  # Hypothesis groups what it saw (e.g. FlakyFailure)
            failures.append(f"{operation.label} [{label}]: {exc}" + "".join(f"\n  - {c}" for c in causes))
    return failures, seen


async def admin_key(settings: Settings) -> str:
    store = KeyStore(write_engine(str(settings.postgres_url), pool_size=1), cache_seconds=0)
    try:
        _, key = await store.create("schemathesis", ["admin"])
    finally:
        await store.close()
    return key


@pytest.mark.parametrize("auth", [False, True], ids=["auth-off", "auth-on"])
@pytest.mark.parametrize("app", ["ingest", "query"])
async def test_openapi_spec_holds_under_schemathesis(migrated: Settings, tmp_path: Path, app: str, auth: bool) -> None:
    settings = migrated.model_copy(update={"auth": auth})
    headers = {"Authorization": f"Bearer {await admin_key(settings)}"} if auth else {}
    if app == "query":
        await insert_rows(settings, make_rows())
    started = time.monotonic()
    process = await asyncio.to_thread(tally_process(app, settings, tmp_path).start)
    try:
        url = f"http://127.0.0.1:{process.port}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            spec = (await http.get("/openapi.json")).json()
        names = {"name": "events_by_type"}
        failures, seen = await asyncio.to_thread(fuzz, spec, url, headers, EXAMPLES[auth], names)
    finally:
        await asyncio.to_thread(process.stop)
    took = time.monotonic() - started
    assert failures == [], "\n\n".join(failures)
    statuses = seen.statuses
    # The run really reached the app: successes and refusals both, and never a 5xx.
    assert any(200 <= s < 300 for s in statuses), statuses
    assert any(400 <= s < 500 for s in statuses), statuses
    assert not any(s >= 500 for s in statuses), statuses
    assert took < 60, took
