"""Every Prometheus metric Tally exports, named in one place (all start with `tally_`).

Multi-process servers set PROMETHEUS_MULTIPROC_DIR; `metrics_payload()` then
merges every worker's samples so one scrape shows them all.
"""

from __future__ import annotations

import os
from typing import Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client import REGISTRY as DEFAULT_REGISTRY

M = TypeVar("M", Counter, Gauge, Histogram)


class Children(Generic[M]):
    """A labelled metric's children, each made once: `.labels()` validates and looks up on every
    call (a few µs), which a hot path serving thousands of requests a second should not repeat.
    Only for label values from a bounded set (routes, outcomes, rollups, statuses)."""

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._made: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._made.get(values)
        if child is None:
            child = self._made[values] = self._metric.labels(*values)
        return child


_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# HTTP (every service)
http_requests = Counter("tally_http_requests_total", "HTTP requests", ["service", "route", "method", "status"])
http_latency = Histogram("tally_http_request_seconds", "HTTP request latency", ["service", "route"], buckets=_LATENCY)
http_in_progress = Gauge("tally_http_in_progress", "Requests being served", ["service"], multiprocess_mode="livesum")
http_shed = Counter(
    "tally_http_shed_total", "Requests refused at once: the process was serving its cap of requests", ["service"]
)
# A histogram, not a gauge: every 50 ms sample is counted, so a 200 ms stall between two scrapes
# shows; in multiprocess mode its buckets add up over the workers like any histogram's.
event_loop_lag = Histogram(
    "tally_event_loop_lag_seconds",
    "How late the event loop ran a timer due every 50 ms (core.looplag); a held loop delays every request",
    ["service"],
    buckets=_LATENCY,
)

# Ingest
events_accepted = Counter("tally_ingest_events_accepted_total", "Events durable in Kafka")
events_rejected = Counter("tally_ingest_events_rejected_total", "Events refused, by reason", ["reason"])
backpressure_rejections = Counter("tally_ingest_backpressure_total", "Requests refused by backpressure", ["cause"])
inflight_bytes = Gauge(
    "tally_ingest_inflight_bytes", "Bytes sent to Kafka and not yet acknowledged", multiprocess_mode="livesum"
)
produce_latency = Histogram(
    "tally_kafka_produce_seconds", "Time from send to broker ack for one batch", buckets=_LATENCY
)
records_produced = Counter("tally_kafka_records_produced_total", "Envelope records acknowledged")
idempotent_replays = Counter("tally_ingest_idempotent_replays_total", "Answers replayed for a repeated Idempotency-Key")
idempotency_store_failures = Counter(
    "tally_ingest_idempotency_store_failures_total",
    "Answers to keyed batches that could not be stored in Redis after the write (a retry may write again)",
)
rate_limited_events = Counter("tally_ingest_rate_limited_events_total", "Events refused by per-key rate limits")
rate_limit_unavailable = Counter(
    "tally_ingest_rate_limit_unavailable_total", "Batches let through because the rate limiter's Redis was unreachable"
)
kafka_breaker_open = Gauge(
    "tally_ingest_kafka_breaker_open", "1 while ingest refuses at once after a Kafka failure", multiprocess_mode="max"
)

# Consumer
consumer_lag_records = Gauge(
    "tally_consumer_lag_records", "Records behind the log end", ["topic", "partition"], multiprocess_mode="max"
)
consumer_lag_seconds = Gauge(
    "tally_consumer_lag_seconds", "Age of the oldest unapplied record", ["topic", "partition"], multiprocess_mode="max"
)
consumer_batch_records = Histogram(
    "tally_consumer_batch_events", "Events per applied batch", buckets=(1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
)
consumer_batch_seconds = Histogram(
    "tally_consumer_batch_seconds", "Time to apply one batch to Postgres", buckets=_LATENCY
)
consumer_events_applied = Counter("tally_consumer_events_applied_total", "Events counted into rollups")
consumer_prepared_events = Gauge(
    "tally_consumer_prepared_events",
    "Events decoded and aggregated, waiting for the batch in flight to commit",
    multiprocess_mode="livesum",
)
consumer_rows_upserted = Counter("tally_consumer_rows_upserted_total", "Rollup rows upserted", ["rollup"])
consumer_fenced = Counter("tally_consumer_fenced_total", "Batches refused because the stored offset moved")
consumer_duplicates = Counter(
    "tally_consumer_duplicates_total", "Events not counted: their event_id was already counted (TALLY_DEDUP)"
)
consumer_rebalances = Counter("tally_consumer_rebalances_total", "Partition assignments received")
dlq_records = Counter("tally_dlq_records_total", "Records or events sent to the dead-letter topic", ["reason"])

# Query
cache_outcomes = Counter("tally_query_cache_total", "Cache outcomes", ["outcome"])
cache_refreshes = Counter("tally_query_cache_refreshes_total", "Background stale refreshes")
version_bumps = Counter(
    "tally_consumer_version_bumps_total", "Rollup versions moved in Redis after a commit (query cache freshness)"
)
version_bump_failures = Counter(
    "tally_consumer_version_bump_failures_total", "Commits whose rollup versions could not be moved in Redis"
)
query_seconds = Histogram(
    "tally_query_seconds", "Query latency by rollup and cache outcome", ["rollup", "outcome"], buckets=_LATENCY
)
query_rows = Counter("tally_query_rows_total", "Rows returned by queries", ["rollup"])
query_computations = Counter(
    "tally_query_computations_total",
    "Rollup queries run against Postgres (miss, background refresh, Redis bypass)",
    ["rollup", "reason"],
)
lag_probe_seconds = Histogram(
    "tally_query_lag_probe_seconds", "Time to measure lag for every partition", buckets=_LATENCY
)
# Lag verdicts from the query service's sampler: -1 UNKNOWN, 0 OK, 1 WARN, 2 STALL, 3 STOP (query.lag_verdict).
consumer_status = Gauge(
    "tally_consumer_status",
    "Lag verdict per partition: -1 UNKNOWN, 0 OK, 1 WARN, 2 STALL, 3 STOP",
    ["group", "topic", "partition"],
    multiprocess_mode="livemax",
)
consumer_group_status = Gauge(
    "tally_consumer_group_status",
    "Lag verdict of the group (its worst partition): -1 UNKNOWN, 0 OK, 1 WARN, 2 STALL, 3 STOP",
    ["group", "topic"],
    multiprocess_mode="livemax",
)
lag_sample_failures = Counter(
    "tally_query_lag_sample_failures_total", "Lag observations that failed (Kafka or Postgres did not answer)"
)
db_pool_in_use = Gauge(
    "tally_db_pool_connections_in_use", "Checked-out Postgres connections", ["service"], multiprocess_mode="livesum"
)

# Auth
auth_failures = Counter(
    "tally_auth_failures_total",
    "Requests refused by API-key auth: missing, malformed, unknown, revoked, scope, unavailable",
    ["reason"],
)


def metrics_payload() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(DEFAULT_REGISTRY), CONTENT_TYPE_LATEST
