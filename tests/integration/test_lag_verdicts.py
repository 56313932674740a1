"""Lag verdicts against real servers: records wait with no consumer (STALL, then STOP), a consumer
catches up (OK), and a sampler that cannot reach Kafka reports UNKNOWN without harming the app."""

from __future__ import annotations

import asyncio
import random
import re
import time
from typing import Any

import httpx
import orjson
import pytest

from core import devstack
from core.settings import Settings
from tests.integration.consumer_helpers import (
    assert_tables_match,
    consumer_settings,
    envelopes,
    make_events,
    produce,
    running,
    wait_for_offsets,
)
from tests.integration.query_support import query_api

pytestmark = pytest.mark.integration

N = 7  # single-event records over 4 partitions: 2, 2, 2, 1


async def lag_until(http: httpx.AsyncClient, done: Any, timeout: float = 20.0) -> dict[str, Any]:
    """GET /v1/ops/lag until `done(report)`; returns that report."""
    deadline = time.monotonic() + timeout
    while True:
        response = await http.get("/v1/ops/lag")
        assert response.status_code == 200, response.text
        report: dict[str, Any] = response.json()
        if done(report):
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"lag report never reached the condition: {report}")
        await asyncio.sleep(0.05)


def gauge(text: str, name: str, **labels: str) -> float | None:
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    series = f"{name}{{{selector}}}" if labels else name
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


async def gauge_until(http: httpx.AsyncClient, value: float, timeout: float = 20.0, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while (found := gauge((await http.get("/metrics")).text, "tally_consumer_group_status", **labels)) != value:
        if time.monotonic() > deadline:
            raise AssertionError(f"tally_consumer_group_status{labels} is {found}, expected {value}")
        await asyncio.sleep(0.05)


async def test_waiting_records_stall_then_stop_and_a_consumer_brings_them_back_to_ok(migrated: Settings) -> None:
    events = make_events(N, random.Random(7))
    ends = await produce(migrated, [(i % 4, value) for i, value in enumerate(envelopes(events, 1))])
    assert ends == {0: 2, 1: 2, 2: 2, 3: 1}
    group = {"group": migrated.consumer_group, "topic": migrated.topic}

    # A long window (10 s): the offsets not moving across two samples is a STALL, not yet a STOP.
    long_window = migrated.model_copy(update={"lag_sample_seconds": 0.2, "lag_window_samples": 50})
    async with query_api(long_window) as http:
        first = (await http.get("/v1/ops/lag")).json()
        assert first["total_lag_records"] == N
        assert {p["partition"]: p["lag_records"] for p in first["partitions"]} == ends
        assert all(p["stored_offset"] is None and p["idle_seconds"] is None for p in first["partitions"])
        window = first["window"]
        assert (window["samples"], window["sample_seconds"], window["seconds"]) == (50, 0.2, 10.0)
        # Fewer than two sampled observations are no evidence of anything yet (a slow first probe may see one).
        assert first["status"] == ("OK" if window["observations"] < 2 else "STALL")

        stalled = await lag_until(http, lambda r: r["status"] != "OK")
        assert stalled["status"] == "STALL", stalled
        assert [p["status"] for p in stalled["partitions"]] == ["STALL"] * 4
        assert stalled["total_lag_records"] == N and stalled["window"]["observations"] >= 2
        await gauge_until(http, 2.0, **group)

    # A short window (3 x 0.2 s): idle for longer than that is a STOP.
    short_window = migrated.model_copy(update={"lag_sample_seconds": 0.2, "lag_window_samples": 3})
    async with query_api(short_window) as http:
        stopped = await lag_until(http, lambda r: r["status"] == "STOP")
        assert [p["status"] for p in stopped["partitions"]] == ["STOP"] * 4
        assert stopped["total_lag_records"] == N
        await gauge_until(http, 3.0, **group)
        metrics = (await http.get("/metrics")).text
        assert gauge(metrics, "tally_consumer_status", partition="3", **group) == 3.0

        async with running(consumer_settings(migrated)) as (_, task):
            await wait_for_offsets(migrated, ends, [task])
            caught_up = await lag_until(http, lambda r: r["total_lag_records"] == 0)
            assert caught_up["status"] == "OK", caught_up
            assert all(p["status"] == "OK" and p["idle_seconds"] is not None for p in caught_up["partitions"])
            assert {p["partition"]: p["stored_offset"] for p in caught_up["partitions"]} == ends
            await gauge_until(http, 0.0, **group)
    await assert_tables_match(migrated, [orjson.loads(e) for e in events])


async def test_a_sampler_that_cannot_reach_kafka_reports_unknown_and_the_app_keeps_serving(
    migrated: Settings,
) -> None:
    no_kafka = migrated.model_copy(
        update={"kafka_bootstrap": f"127.0.0.1:{devstack.free_port()}", "lag_sample_seconds": 0.1}
    )
    group = {"group": migrated.consumer_group, "topic": migrated.topic}
    async with query_api(no_kafka) as http:
        failures = before = gauge((await http.get("/metrics")).text, "tally_query_lag_sample_failures_total") or 0.0
        deadline = time.monotonic() + 15
        while failures < before + 2:  # the counter is process-wide: count this app's failures
            assert time.monotonic() < deadline, "the sampler never tried"
            await asyncio.sleep(0.1)
            metrics = (await http.get("/metrics")).text
            failures = gauge(metrics, "tally_query_lag_sample_failures_total") or 0.0
        assert gauge(metrics, "tally_consumer_group_status", **group) == -1.0
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/v1/rollups/events_by_type", params={"fields": "count"})).status_code == 200
        assert (await http.get("/v1/ops/lag")).status_code == 503
