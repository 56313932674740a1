"""Ingest and consumer counters for the console's ops view, read from those processes' /metrics.

Ingest and consumers run in other processes (and DESIGN's import rule keeps their code
apart), so the query service reads their Prometheus text the way Prometheus does, from
the URLs in TALLY_METRICS_TARGETS, and returns a few counters summed over their labels.
The console turns two answers into rates. Each target is scraped once per request, in
parallel, each within its own timeout: a target that is down is reported, not waited for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import httpx
from prometheus_client.parser import text_string_to_metric_families

from schemas.api import CounterSource, ServiceCounters

COUNTERS = (
    "tally_ingest_events_accepted_total",
    "tally_ingest_events_rejected_total",
    "tally_ingest_backpressure_total",
    "tally_consumer_events_applied_total",
    "tally_dlq_records_total",
)
SCRAPE_TIMEOUT_SECONDS = 1.0
MAX_SCRAPE_BYTES = 4 * 1024 * 1024  # a /metrics page of ours is tens of KiB


def sum_counters(text: str, names: Sequence[str] = COUNTERS) -> dict[str, float]:
    """Each of `names` summed over every label set in a Prometheus text page; absent ones are 0."""
    wanted = set(names)
    totals = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                totals[sample.name] += sample.value
    return totals


class CounterScraper:
    def __init__(self, targets: Sequence[tuple[str, str]], *, timeout: float = SCRAPE_TIMEOUT_SECONDS) -> None:
        self.targets = tuple(targets)
        self.timeout = timeout
        self._http = httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)

    async def scrape(self) -> ServiceCounters:
        at = time.time()
        sources = await asyncio.gather(*(self._one(name, url) for name, url in self.targets))
        return ServiceCounters(at=at, names=list(COUNTERS), sources=list(sources))

    async def _one(self, name: str, url: str) -> CounterSource:
        try:
            # httpx's timeout bounds each read; this bounds the whole page (a trickling target).
            async with asyncio.timeout(self.timeout), self._http.stream("GET", url) as response:
                if response.status_code != 200:
                    return CounterSource(name=name, up=False, error=f"HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_SCRAPE_BYTES:
                        return CounterSource(name=name, up=False, error="metrics page too large")
        except (TimeoutError, httpx.TimeoutException):
            return CounterSource(name=name, up=False, error="timed out")
        except httpx.HTTPError as exc:
            return CounterSource(name=name, up=False, error=type(exc).__name__)
        try:
            counters = sum_counters(body.decode("utf-8", errors="replace"))
        except ValueError:
            return CounterSource(name=name, up=False, error="not Prometheus text")
        return CounterSource(name=name, up=True, counters=counters)

    async def close(self) -> None:
        await self._http.aclose()
