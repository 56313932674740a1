"""`tally ingest --workers 2`: one scrape, whichever worker answers it, shows every worker's counts,
on either server (uvicorn spawns its workers, Granian forks them: both start with the directory set)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from core.settings import Settings
from tests.processes import tally_process

pytestmark = pytest.mark.integration

ACCEPTED = re.compile(r"^tally_ingest_events_accepted_total (\S+)$", re.M)


def accepted_per_process(directory: Path) -> dict[str, float]:
    """What each worker wrote to its own counter file."""
    out: dict[str, float] = {}
    for path in directory.glob("counter_*.db"):
        values = MmapedDict.read_all_values_from_file(str(path))
        out[path.stem] = sum(v for key, v, *_ in values if '"tally_ingest_events_accepted"' in key)
    return out


@pytest.mark.parametrize("server", ["uvicorn", "granian"])
async def test_metrics_add_up_across_workers(
    migrated: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: str
) -> None:
    metrics_dir = tmp_path / "prometheus"
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    ingest = tally_process("ingest", migrated, tmp_path, "--workers", "2", "--server", server).start()
    try:
        url = f"http://127.0.0.1:{ingest.port}"
        fresh = httpx.Limits(max_keepalive_connections=0)  # a new connection each time: both workers accept
        async with httpx.AsyncClient(base_url=url, limits=fresh, timeout=30) as http:
            batch = {"events": [{"type": "w"}] * 5}

            async def post_some() -> None:
                for _ in range(20):
                    # A worker still connecting to Kafka refuses with 503 + Retry-After and writes
                    # nothing; a client retries, as producers should.
                    while (r := await http.post("/v1/events", json=batch)).status_code == 503:
                        await asyncio.sleep(0.1)
                    assert r.status_code == 202, r.text

            await asyncio.gather(*(post_some() for _ in range(6)))
            scrapes = [(await http.get("/metrics")).text for _ in range(10)]
    finally:
        ingest.stop()
    totals = {float(ACCEPTED.search(text).group(1)) for text in scrapes}  # type: ignore[union-attr]
    assert totals == {600.0}
    per_worker = {pid: n for pid, n in accepted_per_process(metrics_dir).items() if n}
    assert len(per_worker) == 2, per_worker
    assert sum(per_worker.values()) == 600
