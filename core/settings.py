"""One settings object, read from `TALLY_*` environment variables.

Built by `get_settings()` when a process starts, never at import time, so tests
and the dev stack can hand each process its own.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.events import EventLimits
from schemas.rollups import RollupSpec, load_rollups

DEFAULT_ROLLUPS = Path(__file__).with_name("rollups.toml")
DEV_CURSOR_SECRET = "tally-dev-cursor-secret"  # noqa: S105 - refused outside env=dev
Server = Literal["uvicorn", "granian"]  # the HTTP servers core.servers knows


class SettingsError(ValueError):
    """A setting that is missing or unsafe for the environment."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TALLY_", extra="ignore", frozen=True)

    env: Literal["dev", "test", "prod"] = "prod"

    # Servers. Unset means "none configured": `tally dev` then starts an embedded one.
    kafka_bootstrap: str | None = None
    postgres_url: str | None = None
    redis_url: str | None = None

    # Kafka layout.
    topic: str = "tally.events"
    dlq_topic: str = "tally.events.dlq"
    topic_partitions: int = Field(6, ge=1)
    topic_replication: int = Field(1, ge=1)
    consumer_group: str = "tally"
    kafka_idempotence: bool = False  # on for real Kafka; Tansu cannot do it
    kafka_compression: Literal["none", "gzip", "lz4", "zstd", "snappy"] = "zstd"  # docs/performance.md
    # Managed Kafka: TLS and SASL (every client Tally makes uses them).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = None
    kafka_ssl_cafile: Path | None = None  # None: the system's trusted CAs

    # Processes.
    bind_host: str = "127.0.0.1"
    ingest_port: int = 8000
    query_port: int = 8001
    consumer_metrics_port: int = 9101
    rollups_file: Path = DEFAULT_ROLLUPS  # the shipped core/rollups.toml
    log_level: str = "info"
    log_format: Literal["json", "text"] = "json"  # one JSON object per line, with the request id
    # SIGTERM: /readyz says 503 for drain_seconds while still serving (so balancers stop sending),
    # then no new connections, in-flight requests get shutdown_grace_seconds, then flush and exit.
    drain_seconds: float = Field(5.0, ge=0)
    shutdown_grace_seconds: float = Field(30.0, gt=0)
    # The HTTP server of ingest and query (core.servers): `--server` on the command line overrides it.
    server: Server = "uvicorn"
    # TLS on the service port itself (HTTP/2 by ALPN under Granian); unset: plain HTTP (h2c under Granian).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    # Auth (API keys with scopes, DESIGN §7). On everywhere but `tally dev`.
    auth: bool = True
    auth_cache_seconds: float = Field(10.0, ge=0)  # a revoked key works up to this long in a process

    # Ingest limits (DESIGN §2).
    max_body_bytes: int = 5 * 1024 * 1024
    max_events: int = 10_000
    max_event_bytes: int = 32 * 1024
    max_depth: int = 8
    max_properties: int = 100
    max_key_chars: int = 128
    max_string_chars: int = 8192
    lateness_seconds: int = 7 * 86_400
    future_seconds: int = 300
    envelope_max_bytes: int = 1024 * 1024
    # Hostile clients: a body must arrive whole within body_timeout_seconds (else 408), and the
    # request's headers may total max_header_bytes (else 431): a stalled upload cannot hold
    # a connection and its buffer forever.
    body_timeout_seconds: float = Field(30.0, gt=0)
    max_header_bytes: int = Field(32 * 1024, ge=1024)

    # Ingest backpressure.
    max_inflight_bytes: int = 64 * 1024 * 1024
    produce_timeout_seconds: float = 5.0
    # 0 by measurement: records batch anyway behind the produce request in flight; a wait only adds
    # latency, and 16 requests at once then left the worker idle (docs/performance.md).
    producer_linger_ms: int = Field(0, ge=0)
    retry_after_seconds: int = 1
    kafka_breaker_seconds: float = 1.0  # after a failed write, refuse at once for this long

    # Ingest idempotency keys and per-key rate limits (both in Redis).
    idempotency_ttl_seconds: int = 86_400
    idempotency_lock_seconds: float = 30.0  # a first request's claim; must outlast a produce
    rate_limit_events_per_second: int = 100_000  # per key, unless the key has its own; 0 = off
    rate_limit_burst_seconds: float = 2.0  # bucket size, in seconds of the rate
    # Each process leases up to this many seconds of a key's rate (at most a tenth of its bucket)
    # when it asks Redis, and spends it without asking again; 0: one Redis call per request.
    rate_limit_lease_seconds: float = Field(0.25, ge=0, le=1.0)

    # Consumer.
    # A batch is what arrived while the one before it was being committed, up to these bounds.
    batch_max_records: int = Field(2_000, ge=1)  # records (envelopes) per transaction
    batch_max_events: int = Field(200_000, ge=1)  # events per transaction (memory: ~0.3 KB each)
    batch_max_wait_ms: int = Field(250, ge=0)  # how long an idle poll waits for the first record
    # How long the broker may hold a fetch that found no new records: the wait an event that arrives
    # meanwhile can see before it is read (Tansu holds a fetch that long even once records arrive).
    fetch_max_wait_ms: int = Field(50, ge=1, le=500)
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 1_000
    dedup: bool = False  # drop events whose event_id was already counted (tally_seen_events)
    dedup_window_hours: int = Field(24, ge=1)  # an event_id is remembered at least this long

    # Retention (core.retention): buckets past a rollup's `retention` are deleted in short batches.
    retention_interval_seconds: float = Field(3_600.0, ge=0)  # each consumer tries this often; 0: never
    retention_batch_rows: int = Field(5_000, ge=1)  # rows deleted per transaction
    retention_pause_seconds: float = Field(0.1, ge=0)  # between two delete transactions
    retention_grace_seconds: int = Field(3_600, ge=0)  # deletes lag the consumers' cut-off by this much

    # Backups (core.backup): where pg_dump/pg_restore are; unset: PATH, /usr/lib/postgresql, the wheel.
    pg_bin_dir: Path | None = None

    # Query and cache (DESIGN §6).
    default_limit: int = 1_000
    max_limit: int = 10_000
    max_offset: int = 100_000
    max_buckets: int = Field(100_000, ge=1)  # buckets one query may group by (range ÷ granularity)
    max_export_rows: int = Field(1_000_000, ge=1)  # rows of one streamed CSV export
    max_exports: int = Field(2, ge=1)  # streamed exports running at once per query process
    statement_timeout_ms: int = 5_000
    # Pools, per query process (README, "Pools, and how to size them"). A query that gets no connection
    # within db_pool_timeout_seconds, or that arrives while query_max_inflight are being served,
    # is a fast 503 with Retry-After instead of a queue.
    db_pool_size: int = Field(10, ge=1, le=500)
    db_max_overflow: int = Field(0, ge=0, le=500)  # connections opened beyond the pool under a burst, then closed
    db_pool_timeout_seconds: float = Field(1.0, gt=0, le=30)
    redis_pool_size: int = Field(64, ge=1, le=10_000)  # connections per Redis client (ingest and query)
    query_max_inflight: int = Field(256, ge=1, le=100_000)  # requests being served per query process
    cache_prefix: str = "tally:"
    cache_fresh_seconds: float = 5.0  # open ranges computed while no consumer has bumped a version
    # Open ranges follow commits (query.cache_policy): fresh while their rollup's version holds, at
    # most this long (what a lost bump can cost), and refreshed at most every cache_refresh_seconds.
    cache_versioned_fresh_seconds: float = Field(60.0, ge=0)
    cache_refresh_seconds: float = Field(0.25, ge=0)
    # Fresh entries also kept in each query process, dropped when a commit is announced
    # (query.local_cache); 0 turns that tier off.
    query_local_cache_mb: int = Field(64, ge=0, le=65_536)
    cache_stale_seconds: float = 60.0
    cache_closed_fresh_seconds: float = 3_600.0
    cursor_secret: str = DEV_CURSOR_SECRET
    # Lag verdicts (query): an observation every lag_sample_seconds, the last lag_window_samples kept.
    lag_sample_seconds: float = Field(5.0, gt=0)
    lag_window_samples: int = Field(10, ge=2)
    # The console's ops view (query.counters): `name=url` pairs, comma-separated, of the /metrics
    # of every ingest and consumer process to sum. Empty: the console shows no rates.
    metrics_targets: str = ""

    # Embedded dev stack (`tally dev`).
    dev_dir: Path = Path(".tally")
    dev_kafka_port: int = 19092
    dev_postgres_port: int = 15432
    dev_redis_port: int = 16379

    @cached_property
    def rollups(self) -> tuple[RollupSpec, ...]:
        return load_rollups(self.rollups_file)

    @property
    def event_limits(self) -> EventLimits:
        return EventLimits(
            max_event_bytes=self.max_event_bytes,
            max_depth=self.max_depth,
            max_properties=self.max_properties,
            max_key_chars=self.max_key_chars,
            max_string_chars=self.max_string_chars,
            lateness_ms=self.lateness_seconds * 1000,
            future_ms=self.future_seconds * 1000,
        )

    @cached_property
    def metrics_target_urls(self) -> tuple[tuple[str, str], ...]:
        """TALLY_METRICS_TARGETS as (name, url) pairs; an entry without `name=` is `target-<n>`."""
        return parse_targets(self.metrics_targets)

    def require(self, *names: str) -> None:
        """Fail at start-up, naming the variables a service needs but lacks."""
        missing = [f"TALLY_{n.upper()}" for n in names if getattr(self, n) is None]
        if missing:
            raise SettingsError(f"set {', '.join(missing)} (or run `tally dev` for an embedded stack)")

    def require_secrets(self) -> None:
        """Refuse the dev cursor secret outside dev and test (a known key signs forged cursors)."""
        if self.env == "prod" and self.cursor_secret == DEV_CURSOR_SECRET:
            raise SettingsError("set TALLY_CURSOR_SECRET: the default is only for env=dev or test")

    @model_validator(mode="after")
    def _sasl_has_credentials(self) -> Settings:
        if self.kafka_security_protocol.startswith("SASL") and not (
            self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                f"TALLY_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "TALLY_KAFKA_SASL_USERNAME and TALLY_KAFKA_SASL_PASSWORD"
            )
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TALLY_TLS_CERT_FILE and TALLY_TLS_KEY_FILE go together: set both or neither")
        return self

    @model_validator(mode="after")
    def _metrics_targets_parse(self) -> Settings:
        parse_targets(self.metrics_targets)  # a malformed list fails at start-up, not on the first scrape
        return self

    @model_validator(mode="after")
    def _default_limit_within_max(self) -> Settings:
        # A default above the maximum would turn every page without `limit` into a streamed export.
        if self.default_limit > self.max_limit:
            raise ValueError(f"TALLY_DEFAULT_LIMIT ({self.default_limit}) is above TALLY_MAX_LIMIT ({self.max_limit})")
        return self

    def process_env(self) -> dict[str, str]:
        """This process's environment with every TALLY_* variable replaced by these settings:
        what a child process (a service, a CLI call, a benchmark's server) must be given."""
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        return {**inherited, **self.to_env()}

    def to_env(self) -> dict[str, str]:
        """The settings as TALLY_* variables, for child processes."""
        out: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is not None:
                out[f"TALLY_{name.upper()}"] = str(value)
        return out


def parse_targets(value: str) -> tuple[tuple[str, str], ...]:
    targets = []
    for i, entry in enumerate((e.strip() for e in value.split(",") if e.strip()), start=1):
        named = "=" in entry.split("://", 1)[0]  # an `=` after the scheme belongs to the URL
        name, _, url = entry.partition("=") if named else ("", "", entry)
        name = name.strip() or f"target-{i}"
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"TALLY_METRICS_TARGETS: {entry!r} is not `name=http(s)://host:port/metrics`")
        targets.append((name, url.strip()))
    return tuple(targets)


def get_settings(**overrides: object) -> Settings:
    return Settings(**overrides)  # type: ignore[arg-type]
