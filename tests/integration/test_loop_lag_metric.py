"""Every service exports `tally_event_loop_lag_seconds` on its /metrics: ingest and query (each under a
real uvicorn), a consumer (on its own metrics port), and `tally ingest --workers 2` in multiprocess mode."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from core.settings import Settings
from ingest.app import create_app as ingest_app
from query.app import create_app as query_app
from tests.conftest import serve
from tests.integration.consumer_helpers import consumer_settings, running
from tests.processes import tally_process

pytestmark = pytest.mark.integration


def lag_samples(text: str, service: str) -> tuple[float, float]:
    """(count, sum) of the service's lag histogram in a scrape; (0, 0) while it has none."""
    found = {}
    for kind in ("count", "sum"):
        match = re.search(rf'^tally_event_loop_lag_seconds_{kind}{{service="{service}"}} (\S+)$', text, re.M)
        found[kind] = float(match.group(1)) if match else 0.0
    return found["count"], found["sum"]


async def scrape_until_sampled(url: str, service: str, samples: int = 3) -> str:
    """/metrics once the monitor has taken `samples` samples (it wakes every 50 ms)."""
    deadline = time.monotonic() + 10
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while True:
            text = (await http.get("/metrics")).text
            if lag_samples(text, service)[0] >= samples or time.monotonic() > deadline:
                return text
            await asyncio.sleep(0.05)


def assert_exported(text: str, service: str) -> None:
    assert "# TYPE tally_event_loop_lag_seconds histogram" in text
    assert f'tally_event_loop_lag_seconds_bucket{{le="0.1",service="{service}"}}' in text
    count, total = lag_samples(text, service)
    assert count >= 3, text[-2000:]
    assert 0 <= total / count < 1.0  # an idle loop: well under a second late on average


async def test_ingest_and_query_export_loop_lag(migrated: Settings) -> None:
    async with serve(ingest_app(migrated)) as url:
        assert_exported(await scrape_until_sampled(url, "ingest"), "ingest")
    async with serve(query_app(migrated)) as url:
        assert_exported(await scrape_until_sampled(url, "query"), "query")


async def test_a_consumer_exports_loop_lag(migrated: Settings) -> None:
    settings = consumer_settings(migrated)
    async with running(settings):
        text = await scrape_until_sampled(f"http://127.0.0.1:{settings.consumer_metrics_port}", "consumer")
    assert_exported(text, "consumer")


async def test_the_monitor_stops_with_the_lifespan(migrated: Settings) -> None:
    def monitors() -> int:
        return sum(1 for t in asyncio.all_tasks() if t.get_name() == "event-loop-lag" and not t.done())

    before = monitors()
    async with serve(ingest_app(migrated)):
        assert monitors() == before + 1
    await asyncio.sleep(0)
    assert monitors() == before


async def test_multiprocess_workers_export_loop_lag(
    migrated: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Histograms need no multiprocess_mode: one scrape adds up both workers' samples."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prometheus"))
    ingest = tally_process("ingest", migrated, tmp_path, "--workers", "2").start()
    try:
        url = f"http://127.0.0.1:{ingest.port}"
        await asyncio.sleep(0.5)  # both workers sample 20 times a second
        text = await scrape_until_sampled(url, "ingest", samples=15)
    finally:
        ingest.stop()
    assert_exported(text, "ingest")
    per_worker = {}  # bucket samples each worker wrote to its own file, read once both have stopped
    for path in (tmp_path / "prometheus").glob("histogram_*.db"):
        values = MmapedDict.read_all_values_from_file(str(path))
        per_worker[path.stem] = sum(v for key, v, *_ in values if '"tally_event_loop_lag_seconds_bucket"' in key)
    assert len([n for n in per_worker.values() if n]) == 2, per_worker
    assert lag_samples(text, "ingest")[0] <= sum(per_worker.values())  # the files kept counting after it
