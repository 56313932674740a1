"""Lag gauges per partition, from what the consumer already knows (no extra broker calls).

Records: highwater (from the last fetch response) minus the next offset to apply;
Tansu's `end_offsets()` is wrong, the fetch's highwater is right. Seconds: the
age of the first record of the batch being applied while behind, 0 once caught up.
"""

from __future__ import annotations

import contextlib
import time

from consumers.batch import TP
from core import metrics


def batch_started(tp: TP, first_timestamp_ms: int, now: float | None = None) -> None:
    """A batch starting at a record written at `first_timestamp_ms` is being applied."""
    age = (time.time() if now is None else now) - first_timestamp_ms / 1000
    metrics.consumer_lag_seconds.labels(tp[0], str(tp[1])).set(max(0.0, age))


def observe(tp: TP, highwater: int | None, next_offset: int) -> None:
    """Update the record lag; a partition that has caught up is 0 seconds behind as well."""
    if highwater is None:
        return
    behind = max(0, highwater - next_offset)
    labels = (tp[0], str(tp[1]))
    metrics.consumer_lag_records.labels(*labels).set(behind)
    if behind == 0:
        metrics.consumer_lag_seconds.labels(*labels).set(0)


def forget(tp: TP) -> None:
    """Drop a revoked partition's series: its new owner reports it now."""
    for gauge in (metrics.consumer_lag_records, metrics.consumer_lag_seconds):
        with contextlib.suppress(KeyError):
            gauge.remove(tp[0], str(tp[1]))
