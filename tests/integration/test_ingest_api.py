"""Ingest over real HTTP into a real broker: what gets a 202 is exactly what is in Kafka."""

from __future__ import annotations

import gzip
import time

import httpx
import orjson
import pytest

from core.settings import Settings
from ingest.app import create_app
from tests.conftest import serve
from tests.kafka_read import read_topic

pytestmark = pytest.mark.integration


async def test_all_body_forms_land_in_kafka_exactly(migrated: Settings) -> None:
    now = int(time.time() * 1000)
    async with serve(create_app(migrated)) as url, httpx.AsyncClient(base_url=url) as http:
        r1 = await http.post("/v1/events", json={"events": [{"type": "a", "ts": now, "properties": {"amount": 1}}]})
        r2 = await http.post("/v1/events", json=[{"type": "b"}, {"type": "bad type"}, {"type": "c", "source": "s"}])
        ndjson = b'{"type":"d"}\nnot json\n\n{"type":"e","user_id":"u"}\n'
        r3 = await http.post("/v1/events", content=ndjson, headers={"content-type": "application/x-ndjson"})
        gz = gzip.compress(orjson.dumps({"events": [{"type": "f"}] * 3}))
        r4 = await http.post("/v1/events", content=gz,
                             headers={"content-type": "application/json", "content-encoding": "gzip",
                                      "x-request-id": "req-gz"})

    assert (r1.status_code, r1.json()) == (202, {"accepted": 1, "rejected": []})
    assert r2.status_code == 202
    assert r2.json()["accepted"] == 2
    assert [x["index"] for x in r2.json()["rejected"]] == [1]
    assert "type is required" in r2.json()["rejected"][0]["error"]
    assert r3.status_code == 202
    assert r3.json()["accepted"] == 2
    assert r3.json()["rejected"][0]["index"] == 1 and "not valid JSON" in r3.json()["rejected"][0]["error"]
    assert (r4.status_code, r4.json()["accepted"]) == (202, 3)
    assert r4.headers["x-request-id"] == "req-gz"

    events = await read_topic(migrated.kafka_bootstrap or "", migrated.topic, expect_events=8)
    types = sorted(e["type"] for e, _ in events)
    assert types == ["a", "b", "c", "d", "e", "f", "f", "f"]
    by_type = {e["type"]: (e, h) for e, h in events}
    assert by_type["a"][0]["ts"] == now and by_type["a"][0]["properties"] == {"amount": 1}
    assert by_type["c"][0]["source"] == "s" and by_type["e"][0]["user_id"] == "u"
    assert by_type["f"][1]["tally-request-id"] == b"req-gz"
    assert by_type["f"][1]["tally-schema"] == b"1"
    assert len({e["event_id"] for e, _ in events}) == 8


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "not valid JSON"),
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "text/plain"),
        ({"content": b"x", "headers": {"content-type": "application/json", "content-encoding": "br"}}, 415, "br"),
        ({"json": []}, 422, "no events"),
        ({"json": [{"type": "bad type"}, {"nope": 1}]}, 422, "no event in the batch is valid"),
        ({"json": [{"type": "a"}] * 11}, 413, "11 events; the limit is 10"),
        ({"content": b"[" + b" " * 2000 + b"]", "headers": {"content-type": "application/json"}}, 413, "1000 bytes"),
    ],
)
async def test_errors_are_problem_json(migrated: Settings, kwargs: dict[str, object], status: int, words: str) -> None:
    settings = migrated.model_copy(update={"max_events": 10, "max_body_bytes": 1000})
    async with serve(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/v1/events", **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["status"] == status and problem["title"]
    assert words in problem["detail"]
    assert problem["instance"] == "/v1/events"
    if status == 422 and "valid" in words:
        assert [e["index"] for e in problem["errors"]] == [0, 1]


async def test_ops_routes(migrated: Settings) -> None:
    async with serve(create_app(migrated)) as url, httpx.AsyncClient(base_url=url) as http:
        await http.post("/v1/events", json=[{"type": "a"}, {"type": "?"}])
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {"kafka": True, "redis": True}
        text = (await http.get("/metrics")).text
        assert 'tally_http_requests_total{method="POST",route="/v1/events",service="ingest",status="202"}' in text
        assert "tally_ingest_events_accepted_total" in text
        assert (await http.get("/openapi.json")).json()["paths"]["/v1/events"]["post"]["responses"]["202"]
