"""Settings and counters. Pure data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Event = dict[str, Any]
# on_rejected(events of the batch, [{"index": i, "error": "..."}, ...])
RejectedCallback = Callable[[list[Event], list[dict[str, Any]]], None]
# on_dropped(events, reason)
DroppedCallback = Callable[[list[Event], str], None]


@dataclass(frozen=True, slots=True)
class Options:
    """How a client batches, retries and bounds its memory. Every field has the default that
    posthog-python / analytics-python / the Snowplow tracker use where they agree."""

    # Batching: a batch leaves when it holds `max_batch_events`, when one more event would make its
    # body larger than `max_batch_bytes`, or when its oldest event is `flush_interval` seconds old.
    max_batch_events: int = 100
    max_batch_bytes: int = 512 * 1024
    flush_interval: float = 0.5
    # Bodies larger than this are sent gzipped (`Content-Encoding: gzip`); 0 gzips every body.
    gzip_min_bytes: int = 1024
    # The local checks run by capture(); the server's own limits are the real ones.
    max_event_bytes: int = 32 * 1024
    # Bounded memory: events captured and not yet resolved (queued, batched or being retried).
    max_queue_events: int = 10_000
    # When the queue is full: "drop" drops the new event (counted in `dropped`, on_dropped called);
    # "block" makes capture() wait up to `block_timeout` seconds for room and then raise QueueFull.
    # (AsyncClient.capture never waits: under "block" it raises QueueFull at once.)
    full_policy: Literal["block", "drop"] = "drop"
    block_timeout: float = 1.0
    # Retries: jittered exponential backoff from `backoff_base`, capped at `backoff_max`, at least
    # the server's Retry-After. A batch is dropped after `max_retries` retries or once
    # `max_retry_seconds` passed since its first attempt.
    max_retries: int = 10
    max_retry_seconds: float = 300.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    request_timeout: float = 15.0
    # close() (and the exit hook) wait this long for the queue to drain; what is left is dropped
    # with on_dropped(events, "client closed ...").
    shutdown_timeout: float = 10.0
    path: str = "/v1/events"
    # Opt-in on-disk spool (a SQLite file): batches are written before their first attempt and
    # removed once the server answered them; a batch a close, a crash or retries spent on an outage
    # left undelivered stays there and is re-sent, with its key, by the next client on that file.
    spool_path: str | None = None

    def __post_init__(self) -> None:
        if self.max_batch_events < 1:
            raise ValueError("max_batch_events must be >= 1")
        if self.max_batch_bytes < 1024:
            raise ValueError("max_batch_bytes must be >= 1024")
        if self.max_queue_events < 1:
            raise ValueError("max_queue_events must be >= 1")
        if self.full_policy not in ("block", "drop"):
            raise ValueError("full_policy must be 'block' or 'drop'")
        if self.flush_interval <= 0 or self.backoff_base <= 0 or self.backoff_max < self.backoff_base:
            raise ValueError("flush_interval and backoff_base must be > 0, backoff_max >= backoff_base")
        if self.max_retries < 0 or self.max_retry_seconds < 0:
            raise ValueError("max_retries and max_retry_seconds must be >= 0")


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a client's counters (events, not batches, except `retried`).

    Every capture() that returned normally ends in exactly one of sent, rejected, dropped or
    (with a spool) spooled; until then it is counted in queue_depth. With a spool, `captured`
    includes the events a previous client left there.
    """

    captured: int
    sent: int  # accepted by the server (a 2xx): durable in Kafka
    retried: int  # retry attempts (of batches)
    rejected: int  # refused by the server as invalid (202 `rejected` entries, or a 422)
    dropped: int  # given up on: queue full, retries exhausted, a non-retryable answer, closed
    queue_depth: int  # captured and not yet resolved
    spooled: int = 0  # left in the spool for the next start (only with spool_path)


class QueueFull(RuntimeError):
    """capture() under full_policy="block" found no room within block_timeout."""


class ClientClosed(RuntimeError):
    """capture() after close()."""
