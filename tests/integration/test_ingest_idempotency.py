"""Idempotency-Key on real Redis and Kafka: a retried batch is written once, whatever the timing."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from core import devstack
from core.settings import Settings
from ingest.app import create_app
from ingest.idempotency import Claim, IdempotencyStore, derived_event_id, fingerprint
from tests.conftest import serve
from tests.kafka_read import read_topic

pytestmark = pytest.mark.integration

BATCH = {"events": [{"type": "a"}, {"type": "b", "event_id": "0b6a4c5e-1f0d-4c1e-9d3a-2f6b9a8c7d10"}, {"type": "x y"}]}


async def test_a_retry_replays_the_first_answer_and_writes_nothing(migrated: Settings) -> None:
    async with serve(create_app(migrated)) as url, httpx.AsyncClient(base_url=url) as http:
        first = await http.post("/v1/events", json=BATCH, headers={"Idempotency-Key": "k-1"})
        again = await http.post("/v1/events", json=BATCH, headers={"Idempotency-Key": "k-1"})
        other = await http.post("/v1/events", json={"events": [{"type": "a"}]}, headers={"Idempotency-Key": "k-1"})
        fresh = await http.post("/v1/events", json=BATCH, headers={"Idempotency-Key": "k-2"})
    assert first.status_code == 202 and first.json()["accepted"] == 2
    assert "idempotent-replayed" not in first.headers
    assert again.status_code == 202 and again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert other.status_code == 422 and "different request body" in other.json()["detail"]
    assert fresh.status_code == 202

    events = await read_topic(migrated.kafka_bootstrap or "", migrated.topic, expect_events=4)
    ids = sorted(e["event_id"] for e, _ in events)
    # Events without an id get one derived from the key, so a retry re-sends the same id.
    assert ids == sorted([derived_event_id("anonymous", "k-1", 0), derived_event_id("anonymous", "k-2", 0),
                          BATCH["events"][1]["event_id"], BATCH["events"][1]["event_id"]])


async def test_a_refusal_is_replayed_too(migrated: Settings) -> None:
    bad = {"events": [{"type": "x y"}]}
    async with serve(create_app(migrated)) as url, httpx.AsyncClient(base_url=url) as http:
        first = await http.post("/v1/events", json=bad, headers={"Idempotency-Key": "bad"})
        again = await http.post("/v1/events", json=bad, headers={"Idempotency-Key": "bad"})
    assert first.status_code == again.status_code == 422
    assert again.content == first.content and again.headers["content-type"] == "application/problem+json"


async def test_in_flight_key_is_409(migrated: Settings) -> None:
    body = b'{"events":[{"type":"a"}]}'
    async with serve(create_app(migrated)) as url, httpx.AsyncClient(base_url=url) as http:
        from redis.asyncio import Redis

        redis = Redis.from_url(str(migrated.redis_url))
        store = IdempotencyStore(redis, migrated.cache_prefix, ttl_seconds=60, lock_seconds=30, retry_after=1)
        claim = await store.claim("anonymous", "busy", fingerprint("application/json", body))
        r = await http.post("/v1/events", content=body,
                            headers={"Idempotency-Key": "busy", "content-type": "application/json"})
        await redis.aclose()
    assert isinstance(claim, Claim)  # the test holds the key, as a first request in flight would
    assert r.status_code == 409 and r.headers["retry-after"] == "1"
    assert "still in progress" in r.json()["detail"]


async def test_concurrent_duplicates_write_once(migrated: Settings) -> None:
    batch = {"events": [{"type": "c", "properties": {"i": i}} for i in range(50)]}
    async with serve(create_app(migrated)) as url, httpx.AsyncClient(base_url=url) as http:
        responses = await asyncio.gather(*(
            http.post("/v1/events", json=batch, headers={"Idempotency-Key": "same"}) for _ in range(20)
        ))
        # Whoever lost the race and got 409 retries until it gets the stored answer.
        for i, r in enumerate(responses):
            while r.status_code == 409:
                await asyncio.sleep(0.05)
                r = await http.post("/v1/events", json=batch, headers={"Idempotency-Key": "same"})
            responses[i] = r
    assert [r.status_code for r in responses] == [202] * 20
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
    assert {r.content for r in responses} == {responses[0].content}
    events = await read_topic(migrated.kafka_bootstrap or "", migrated.topic, expect_events=50)
    assert sorted(e["properties"]["i"] for e, _ in events) == list(range(50))


async def test_bad_keys_are_400(migrated: Settings) -> None:
    async with serve(create_app(migrated)) as url, httpx.AsyncClient(base_url=url) as http:
        empty = await http.post("/v1/events", json=BATCH, headers={"Idempotency-Key": ""})
        long = await http.post("/v1/events", json=BATCH, headers={"Idempotency-Key": "k" * 256})
    assert empty.status_code == long.status_code == 400
    assert "255 printable ASCII" in long.json()["detail"]


async def test_redis_down_refuses_keyed_requests_only(migrated: Settings) -> None:
    no_redis = migrated.model_copy(update={"redis_url": f"redis://127.0.0.1:{devstack.free_port()}/0"})
    async with serve(create_app(no_redis)) as url, httpx.AsyncClient(base_url=url) as http:
        keyed = await http.post("/v1/events", json=BATCH, headers={"Idempotency-Key": str(uuid.uuid4())})
        plain = await http.post("/v1/events", json=BATCH)
        ready = await http.get("/readyz")
    assert keyed.status_code == 503 and keyed.headers["retry-after"] == "1"
    assert "idempotency store cannot be reached" in keyed.json()["detail"]
    assert plain.status_code == 202 and "ratelimit-limit" not in plain.headers  # the limiter fails open
    assert ready.status_code == 200 and ready.json()["degraded"] == ["redis"]
    events = await read_topic(migrated.kafka_bootstrap or "", migrated.topic, expect_events=2)
    assert len(events) == 2
