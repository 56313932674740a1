"""The whole pipeline as an operator runs it: `tally ingest`, `tally consume`, `tally query`
processes over HTTP against real servers. The invariant: the rollups equal the aggregates
computed directly from the accepted events, exactly."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.settings import Settings
from tests import oracle
from tests.e2e.conftest import exact_json, expected_events_by_type, post_batches, table_rows, wait_for_total
from tests.integration.query_support import stored
from tests.processes import tally_process

pytestmark = pytest.mark.e2e

MEASURES = ["count", "sum_properties_amount", "min_properties_amount", "max_properties_amount"]


def api_key(row: dict[str, Any], dims: list[str]) -> tuple[Any, ...]:
    bucket = datetime.fromisoformat(row["bucket"]).astimezone(UTC)
    return (bucket, *(row[d] for d in dims))


async def walk(http: httpx.AsyncClient, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
    """Every page through next_cursor."""
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(10_000):
        page = exact_json(await http.get(path, params={**params, **({"cursor": cursor} if cursor else {})}))
        rows.extend(page["data"])
        cursor = page["next_cursor"]
        if cursor is None:
            return rows
    raise AssertionError("pagination did not end")


async def test_pipeline_end_to_end_exact(migrated: Settings, tmp_path: Path) -> None:
    ingest = tally_process("ingest", migrated, tmp_path).start()
    consumer = tally_process("consume", migrated, tmp_path).start()
    query = tally_process("query", migrated, tmp_path).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ingest.port}", timeout=30) as http:
            accepted = await post_batches(http, random.Random(7), batches=24, size=150)
        assert len(accepted) == 3600
        await wait_for_total(str(migrated.postgres_url), len(accepted))

        # The tables hold exactly the aggregates of the accepted events.
        expected = expected_events_by_type(accepted)
        got = await table_rows(str(migrated.postgres_url), "agg_events_by_type", ["type", "source"], MEASURES)
        assert got == expected
        views = await table_rows(str(migrated.postgres_url), "agg_page_views",
                                 ["properties_country", "properties_path"], ["count"])
        assert views == {k: {"count": v["count"]} for k, v in oracle.page_views(accepted).items()}

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{query.port}", timeout=30) as http:
            # Lag is zero once everything is applied.
            lag = (await http.get("/v1/ops/lag")).json()
            assert lag["total_lag_records"] == 0
            assert all(p["lag_records"] == 0 and p["lag_seconds"] == 0 for p in lag["partitions"])

            # Cursor pagination visits every row exactly once, with exact values.
            params = {"from": "-4h", "to": "now", "granularity": "minute", "limit": "37"}
            rows = await walk(http, "/v1/rollups/events_by_type", params)
            keys = [api_key(r, ["type", "source"]) for r in rows]
            assert len(keys) == len(set(keys)) == len(expected)
            assert {api_key(r, ["type", "source"]): {m: r[m] for m in MEASURES} for r in rows} == expected

            # Re-bucketed to hours, measures merge exactly.
            hourly = await walk(http, "/v1/rollups/events_by_type", {**params, "granularity": "hour", "limit": "1000"})
            assert {api_key(r, ["type", "source"]): {m: r[m] for m in MEASURES} for r in hourly} == (
                expected_events_by_type(accepted, "hour")
            )

            # A repeated query is a cache hit with the same stored bytes (only the served meta differs).
            first = await http.get("/v1/rollups/events_by_type", params={**params, "fields": "type,count"})
            again = await http.get("/v1/rollups/events_by_type", params={**params, "fields": "type,count"})
            assert first.headers["x-cache"] == "miss" and again.headers["x-cache"] == "hit"
            assert stored(again) == stored(first) and again.headers["etag"] == first.headers["etag"]
            totals: dict[str, int] = {}
            for e in accepted:
                totals[e["type"]] = totals.get(e["type"], 0) + 1
            assert {r["type"]: r["count"] for r in exact_json(first)["data"]} == totals
    finally:
        for proc in (query, consumer, ingest):
            proc.stop()


async def test_consumer_sigkill_and_restart_stays_exact(migrated: Settings, tmp_path: Path) -> None:
    ingest = tally_process("ingest", migrated, tmp_path).start()
    first = tally_process("consume", migrated, tmp_path).start()
    second = None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ingest.port}", timeout=30) as http:
            rng = random.Random(11)
            posting = asyncio.create_task(post_batches(http, rng, batches=60, size=100, pause=0.05))
            # Kill the consumer mid-stream, once it has applied some but not all of the events.
            async with migrated_conn(migrated) as conn:
                for _ in range(600):
                    applied = await conn.fetchval("SELECT coalesce(sum(count), 0) FROM agg_events_by_type")
                    if applied > 0:
                        break
                    await asyncio.sleep(0.05)
            first.kill()
            assert not posting.done(), "the stream ended before the kill; make it longer"
            second = tally_process("consume", migrated, tmp_path).start()
            accepted = await posting
        await wait_for_total(str(migrated.postgres_url), len(accepted), timeout=120)
        got = await table_rows(str(migrated.postgres_url), "agg_events_by_type", ["type", "source"], MEASURES)
        assert got == expected_events_by_type(accepted)
        assert sum(r["count"] for r in got.values()) == 6000
        assert isinstance(next(iter(got.values()))["count"], int)
        assert all(v["sum_properties_amount"] is None or isinstance(v["sum_properties_amount"], Decimal)
                   for v in got.values())
    finally:
        for proc in (second, first, ingest):
            if proc is not None:
                proc.stop()


class migrated_conn:
    def __init__(self, settings: Settings) -> None:
        self.url = str(settings.postgres_url)

    async def __aenter__(self) -> Any:
        import asyncpg

        self.conn = await asyncpg.connect(self.url)
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()
