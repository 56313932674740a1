"""A real Prometheus (Debian's binary) scrapes real `tally ingest|consume|query` processes with the
scrape jobs and alert rules of infra/prometheus, and its query API reads back exactly what the
test did: events accepted and rejected by reason, requests by status, events applied, lag per
partition, cache outcomes, lag verdicts; every alert rule evaluates cleanly and every dashboard
query runs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from core import devstack
from core.settings import Settings
from tests.infra.support import (
    ALERTS,
    PROMETHEUS_CONFIG,
    Stack,
    alert_rules,
    dashboard_exprs,
    load_yaml,
    post_events,
    query_twice,
    start_stack,
    tool,
    until,
    without_grafana_variables,
)

pytestmark = pytest.mark.e2e

# What the test posts: three accepted batches with invalid events among them, one batch with no valid event.
BATCHES = [(100, {"type": 2}), (100, {"ts": 1}), (100, {"type": 1, "ts": 1})]
ACCEPTED = sum(valid for valid, _ in BATCHES)
REJECTED = {"type": 2 + 1 + 1, "ts": 1 + 1}  # the last "type" is the all-invalid batch's (a 422)

# Panels whose queries must return series after this traffic (the others may be empty: no 5xx, no refusals).
PANELS_WITH_DATA = {
    "Processes up",
    "Lag verdict",
    "Events accepted/s",
    "Consumer lag",
    "Events accepted and rejected",
    "POST /v1/events by status",
    "Kafka produce latency",
    "POST /v1/events latency",
    "Kafka in flight and breaker",
    "Lag per partition (records)",
    "Lag per partition (seconds)",
    "Lag verdict per partition",
    "Throughput",
    "Batch duration and size",
    "Query latency",
    "Cache outcomes",
    "Cache hit ratio",
    "Postgres computations",
    "DB pool in use",
    "Rows returned",
    "Query requests by route and status",
    "Lag sampler",
    "Process up",
    "HTTP p99 by service and route",
    "Requests in progress",
}


class Prometheus:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        body = httpx.get(f"{self.url}{path}", params=params, timeout=10).json()  # a bad query's 400 says why
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def values(self, expr: str, label: str | None = None) -> dict[str | None, float]:
        """{value of `label` (None without one): sample value}."""
        return {(r["metric"].get(label) if label else None): float(r["value"][1]) for r in self.query(expr)}


@contextlib.contextmanager
def prometheus(stack: Stack, tmp: Path) -> Iterator[Prometheus]:
    """Debian's `prometheus` with infra/prometheus/prometheus.yml, retargeted at the test's processes,
    scraping and evaluating the alert rules every second."""
    binary = tool("prometheus")
    port = devstack.free_port()
    config = load_yaml(PROMETHEUS_CONFIG)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    ports = {
        "ingest": stack.ingest.port,
        "query": stack.query.port,
        "consumer": stack.consumer.port,
        "prometheus": port,
    }
    assert sorted(job["job_name"] for job in config["scrape_configs"]) == sorted(ports)
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    config_path = tmp / "prometheus.yml"
    config_path.write_text(json.dumps(config))  # YAML is a superset of JSON
    log_path = tmp / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=devstack._die_with_parent,
        )
    try:
        deadline = time.monotonic() + 20
        while not _ready(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not become ready; log:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        yield Prometheus(port)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture
def stack(migrated: Settings, tmp_path: Path) -> Iterator[Stack]:
    yield from start_stack(migrated.model_copy(update={"lag_sample_seconds": 0.5}), tmp_path)


async def equals(read: Any, expected: Any, what: str, timeout: float = 30.0) -> None:
    """Poll Prometheus until `read()` is exactly `expected`; fail with the last reading."""
    last: list[Any] = [None]

    def check() -> bool:
        last[0] = read()
        return bool(last[0] == expected)

    try:
        await until(check, what, timeout)
    except pytest.fail.Exception:
        pytest.fail(f"{what}: Prometheus reads {last[0]!r}, expected {expected!r}", pytrace=False)


async def test_prometheus_reads_exactly_what_the_processes_did(stack: Stack, tmp_path: Path) -> None:
    settings = stack.settings
    group = {"group": settings.consumer_group, "topic": settings.topic}
    with prometheus(stack, tmp_path) as prom:
        await equals(
            lambda: prom.values('up{job=~"ingest|query|consumer"}', "job"),
            {"ingest": 1.0, "query": 1.0, "consumer": 1.0},
            "every process scraped",
        )

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.ingest.port}", timeout=30) as http:
            for valid, rejected in BATCHES:
                await post_events(http, valid, rejected)
            nothing_valid = await http.post("/v1/events", json=[{"type": "has space"}])
            assert nothing_valid.status_code == 422

        # Ingest: accepted, rejected by reason, batches by status.
        await equals(
            lambda: prom.values('sum(tally_ingest_events_accepted_total{job="ingest"})'),
            {None: float(ACCEPTED)},
            "events accepted",
        )
        await equals(
            lambda: prom.values('sum by (reason) (tally_ingest_events_rejected_total{job="ingest"})', "reason"),
            {reason: float(n) for reason, n in REJECTED.items()},
            "events rejected by reason",
        )
        await equals(
            lambda: prom.values(
                'sum by (status) (tally_http_requests_total{job="ingest",route="/v1/events",method="POST"})', "status"
            ),
            {"202": float(len(BATCHES)), "422": 1.0},
            "POST /v1/events by status",
        )

        # Consumer: every accepted event applied, every partition caught up (0 records, 0 seconds).
        await equals(
            lambda: prom.values('sum(tally_consumer_events_applied_total{job="consumer"})'),
            {None: float(ACCEPTED)},
            "events applied",
        )
        partitions = {str(p): 0.0 for p in range(settings.topic_partitions)}
        for gauge in ("tally_consumer_lag_records", "tally_consumer_lag_seconds"):
            await equals(
                lambda g=gauge: prom.values(f'{g}{{job="consumer",topic="{settings.topic}"}}', "partition"),
                partitions,
                f"{gauge} per partition",
            )
        conn = await asyncpg.connect(str(settings.postgres_url))
        try:
            assert await conn.fetchval("SELECT sum(count) FROM agg_events_by_type") == ACCEPTED
        finally:
            await conn.close()

        # Query: a miss, then a hit; the lag sampler's verdicts are OK for the group and each partition.
        await query_twice(stack.query.port)
        await equals(
            lambda: prom.values('sum by (outcome) (tally_query_cache_total{job="query"})', "outcome"),
            {"miss": 1.0, "hit": 1.0},
            "cache outcomes",
        )
        selector = f'group="{group["group"]}",topic="{group["topic"]}"'
        await equals(
            lambda: prom.values(f'tally_consumer_group_status{{job="query",{selector}}}'),
            {None: 0.0},
            "the group's lag verdict",
        )
        await equals(
            lambda: prom.values(f'tally_consumer_status{{job="query",{selector}}}', "partition"),
            partitions,
            "the partitions' lag verdicts",
        )

        # Every alert rule of alerts.yml is loaded and has evaluated without error; none fires.
        names = sorted(rule["alert"] for rule in alert_rules())

        def rules() -> list[dict[str, Any]]:
            return [r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]]

        await until(lambda: all(not r["lastEvaluation"].startswith("0001") for r in rules()), "every rule evaluated")
        assert sorted(r["name"] for r in rules()) == names
        assert {r["name"]: (r["health"], r.get("lastError", "")) for r in rules()} == dict.fromkeys(names, ("ok", ""))
        assert [a for a in prom.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"] == []

        # Every dashboard query runs; those of the panels this traffic feeds return series.
        await asyncio.sleep(2)  # rate() over [1m] needs two scrapes after the traffic
        exprs = dashboard_exprs()
        assert {title for title, _ in exprs} >= PANELS_WITH_DATA, "a panel named here is gone from the dashboard"
        empty = []
        for title, expr in exprs:
            result = prom.query(without_grafana_variables(expr, "1m"))
            if not result and title in PANELS_WITH_DATA:
                empty.append((title, expr))
        assert empty == []
