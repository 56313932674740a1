"""Operator endpoints of the query service: lag from Kafka + Postgres with no consumer running,
health, readiness, metrics, and the OpenAPI description of every parameter."""

from __future__ import annotations

import time

import asyncpg
import pytest

from core.kafka import producer
from core.settings import Settings
from tests.integration.query_support import fill_coarse, query_api

pytestmark = pytest.mark.integration

AGE_S = 3_600  # records are produced with timestamps an hour old, one second apart


async def _produce(settings: Settings, counts: dict[int, int]) -> int:
    """`counts[p]` records to partition p (acks=all), timestamps AGE_S + ... seconds old; returns base ms."""
    base_ms = int(time.time() * 1000) - AGE_S * 1000
    p = producer(settings)
    await p.start()
    try:
        for partition, n in counts.items():
            for i in range(n):
                await p.send_and_wait(settings.topic, b"{}", partition=partition, timestamp_ms=base_ms + i * 1000)
    finally:
        await p.stop()
    return base_ms


async def _store_offsets(settings: Settings, rows: list[tuple[str, int, int]]) -> None:
    conn = await asyncpg.connect(str(settings.postgres_url))
    try:
        await conn.executemany(
            "INSERT INTO tally_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (group_id, topic, partition) DO UPDATE SET next_offset = EXCLUDED.next_offset",
            [(group, settings.topic, partition, offset) for group, partition, offset in rows],
        )
    finally:
        await conn.close()


async def test_lag_per_partition_with_every_consumer_down(migrated: Settings) -> None:
    base_ms = await _produce(migrated, {0: 5, 1: 4, 2: 6})  # partition 3 stays empty
    group = migrated.consumer_group
    # p0 applied 3 of 5, p1 caught up, p2 and p3 never stored; another group's rows are ignored.
    await _store_offsets(migrated, [(group, 0, 3), (group, 1, 4), ("someone-else", 2, 1)])
    async with query_api(migrated) as http:
        response = await http.get("/v1/ops/lag")
        assert response.status_code == 200, response.text
        report = response.json()
        now_ms = time.time() * 1000
        assert (report["group"], report["topic"]) == (group, migrated.topic)
        parts = {p["partition"]: p for p in report["partitions"]}
        assert sorted(parts) == [0, 1, 2, 3]
        assert [(parts[i]["end_offset"], parts[i]["stored_offset"], parts[i]["lag_records"]) for i in range(4)] == [
            (5, 3, 2), (4, 4, 0), (6, None, 6), (0, None, 0),
        ]
        # Lag in seconds: the age of the record at the stored offset (or the first, if none stored).
        assert parts[0]["lag_seconds"] == pytest.approx((now_ms - (base_ms + 3_000)) / 1000, abs=5)
        assert parts[2]["lag_seconds"] == pytest.approx((now_ms - base_ms) / 1000, abs=5)
        assert parts[1]["lag_seconds"] == 0 and parts[3]["lag_seconds"] == 0
        assert report["total_lag_records"] == 8
        assert report["max_lag_seconds"] == parts[2]["lag_seconds"]

        # The probe is reused: later records and offsets are seen on the next call.
        await _produce(migrated, {3: 2})
        await _store_offsets(migrated, [(group, 0, 5), (group, 2, 6)])
        again = {p["partition"]: p for p in (await http.get("/v1/ops/lag")).json()["partitions"]}
    assert [(again[i]["end_offset"], again[i]["lag_records"]) for i in range(4)] == [(5, 0), (4, 0), (6, 0), (2, 2)]
    assert again[0]["lag_seconds"] == 0 and again[3]["lag_seconds"] > AGE_S - 5


async def test_health_readiness_metrics(migrated: Settings) -> None:
    async with query_api(migrated) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        await http.get("/v1/rollups/events_by_type", params={"fields": "count"})
        metrics = (await http.get("/metrics")).text
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"postgres": True, "redis": True, "kafka": True}
    assert 'tally_http_requests_total{method="GET",route="/v1/rollups/{name}",service="query",status="200"}' in metrics
    for series in ("tally_query_cache_total", "tally_query_seconds_bucket", "tally_query_rows_total",
                   "tally_query_computations_total", "tally_db_pool_connections_in_use"):
        assert series in metrics, series


async def test_openapi_documents_every_parameter(migrated: Settings) -> None:
    async with query_api(migrated) as http:
        spec = (await http.get("/openapi.json")).json()
    operation = spec["paths"]["/v1/rollups/{name}"]["get"]
    params = {p["name"]: p for p in operation["parameters"]}
    assert set(params) == {"name", "from", "to", "granularity", "fields", "filter", "order", "limit", "cursor",
                           "offset", "format", "tz", "total"}
    for name, param in params.items():
        assert param.get("description"), name
        assert "example" in param or "examples" in param, name
    assert "text/csv" in operation["responses"]["200"]["content"]
    assert "/v1/ops/lag" in spec["paths"] and "/v1/rollups" in spec["paths"]


async def test_dependencies_down_are_503_not_hangs(migrated: Settings) -> None:
    """Kafka down: queries still answer, lag is a 503. Postgres down: queries are a 503."""
    from core import devstack

    no_kafka = migrated.model_copy(update={"kafka_bootstrap": f"127.0.0.1:{devstack.free_port()}"})
    async with query_api(no_kafka) as http:
        started = time.monotonic()
        lag = await http.get("/v1/ops/lag")
        query = await http.get("/v1/rollups/events_by_type", params={"fields": "count"})
        ready = await http.get("/readyz")
        elapsed = time.monotonic() - started
    assert lag.status_code == 503 and lag.headers["content-type"] == "application/problem+json"
    assert "retry-after" in lag.headers
    assert query.status_code == 200
    # Still ready: queries work without Kafka; the missing dependency is reported as degraded.
    assert ready.status_code == 200 and ready.json()["checks"]["kafka"] is False
    assert ready.json()["degraded"] == ["kafka"]
    assert elapsed < 15

    closed = f"postgresql://postgres@127.0.0.1:{devstack.free_port()}/postgres"
    no_postgres = migrated.model_copy(update={"postgres_url": closed})
    async with query_api(no_postgres) as http:
        cached = await http.get("/v1/rollups/events_by_type", params={"fields": "count"})
        query = await http.get("/v1/rollups/events_by_type", params={"fields": "count"},
                               headers={"Cache-Control": "no-cache"})
    assert cached.status_code == 200 and cached.headers["x-cache"] == "hit"  # the cache still answers
    assert query.status_code == 503, query.text
    assert query.headers["content-type"] == "application/problem+json"


async def test_statement_timeout_is_a_503(migrated: Settings) -> None:
    conn = await asyncpg.connect(str(migrated.postgres_url))
    try:
        await conn.execute(
            "INSERT INTO agg_events_by_type (bucket, type, source, count) "
            "SELECT timestamptz '2026-01-01' + make_interval(mins => i), 't' || (i % 997), 's' || (i % 7), 1 "
            "FROM generate_series(0, 299999) AS i"
        )
        # Coarse tables as the consumer keeps them; with 997 x 7 keys each day table row is one minute's,
        # so the month query aggregates 300k rows whichever table it reads.
        await fill_coarse(conn, migrated, "events_by_type")
    finally:
        await conn.close()
    # 10 ms: far below the 300k-row aggregation, far above the driver's own connection set-up queries.
    impatient = migrated.model_copy(update={"statement_timeout_ms": 10})
    async with query_api(impatient) as http:
        response = await http.get("/v1/rollups/events_by_type", params={
            "from": "2026-01-01T00:00:00Z", "to": "2027-01-01T00:00:00Z", "granularity": "month"})
    assert response.status_code == 503, response.text
    assert "statement timeout" in response.json()["detail"] and response.headers["retry-after"] == "5"
