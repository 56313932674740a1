"""An event ingest accepted counts in its own event-time bucket however late the consumer applies it.

A 202 promises the event counts (README, delivery guarantee 1): the lateness window is
checked once, at ingest, against the receive time. A consumer that lags past that
window, or whose clock is behind ingest's, must still count the event, not DLQ it.
"""

from __future__ import annotations

import random

import orjson
import pytest
from prometheus_client import REGISTRY

from core.settings import Settings
from schemas.events import normalize_event
from tests.integration.consumer_helpers import (
    assert_tables_match,
    consumer_settings,
    envelopes,
    now_ms,
    produce,
    running,
    stored_offsets,
    wait_for_offsets,
)

pytestmark = pytest.mark.integration
DAY_MS = 86_400_000


def dlq_total() -> float:
    return sum(
        sample.value
        for metric in REGISTRY.collect()
        if metric.name == "tally_dlq_records"
        for sample in metric.samples
        if sample.name == "tally_dlq_records_total"
    )


async def test_events_older_than_the_lateness_window_or_ahead_of_the_clock_count_in_their_bucket(
    migrated: Settings,
) -> None:
    settings = consumer_settings(migrated, lateness_seconds=3_600, future_seconds=60)
    rng = random.Random(31)
    now = now_ms()
    encoded: list[bytes] = []
    # Accepted at the time (ts within the window of its receipt), applied only now: 2 h to 40 days late,
    # and some that ingest's clock placed ahead of this consumer's by more than future_seconds.
    ages = [2 * 3_600_000, 3 * DAY_MS, 40 * DAY_MS, -10 * 60_000, -DAY_MS]
    for i in range(200):
        ts = now - ages[i % len(ages)] - rng.randrange(60_000)
        raw = {"type": rng.choice(["click", "purchase"]), "ts": ts, "source": rng.choice(["web", "ios"]),
               "properties": {"amount": rng.choice([1, 2.5, -3]), "country": "DE", "path": "/"}}
        if i % 3 == 0:
            raw["type"] = "page_view"
        encoded.append(normalize_event(raw, ts + rng.randrange(1_000), settings.event_limits))
    assert all(orjson.loads(e)["ts"] < now - settings.lateness_seconds * 1000 for e in encoded[:3])
    dead_before = dlq_total()
    ends = await produce(settings, [(i % 4, v) for i, v in enumerate(envelopes(encoded, 9))])

    async with running(settings) as (_, task):
        await wait_for_offsets(settings, ends, [task])

    assert await stored_offsets(settings) == ends
    await assert_tables_match(settings, [orjson.loads(e) for e in encoded])
    assert dlq_total() == dead_before
