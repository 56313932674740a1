"""End-to-end helpers: post generated batches in every body form and remember what was accepted."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import time
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import orjson

from tests import oracle

FORMS = ("object", "array", "ndjson", "gzip")


def encode(events: list[Any], form: str) -> tuple[bytes, dict[str, str]]:
    if form == "object":
        return orjson.dumps({"events": events}), {"content-type": "application/json"}
    if form == "array":
        return orjson.dumps(events), {"content-type": "application/json"}
    if form == "ndjson":
        return b"\n".join(orjson.dumps(e) for e in events), {"content-type": "application/x-ndjson"}
    return gzip.compress(orjson.dumps({"events": events})), {
        "content-type": "application/json", "content-encoding": "gzip"}


async def post_batches(
    http: httpx.AsyncClient, rng: random.Random, *, batches: int, size: int, pause: float = 0.0
) -> list[dict[str, Any]]:
    """Post `batches` batches mixing valid and invalid events; return the accepted events."""
    accepted: list[dict[str, Any]] = []
    for i in range(batches):
        valid = oracle.make_events(rng, size, int(time.time() * 1000))
        batch: list[Any] = list(valid)
        bad_at = rng.randrange(len(batch) + 1)
        batch[bad_at:bad_at] = oracle.invalid_events(rng)
        body, headers = encode(batch, FORMS[i % len(FORMS)])
        response = await http.post("/v1/events", content=body, headers=headers)
        assert response.status_code == 202, response.text
        result = response.json()
        assert [r["index"] for r in result["rejected"]] == [bad_at], result
        assert result["accepted"] == size
        accepted.extend(valid)
        if pause:
            await asyncio.sleep(pause)
    return accepted


Rows = dict[tuple[Any, ...], dict[str, Any]]


async def table_rows(database_url: str, table: str, dims: list[str], measures: list[str]) -> Rows:
    conn = await asyncpg.connect(database_url)
    try:
        cols = ", ".join(["bucket", *dims, *measures])
        rows = await conn.fetch(f"SELECT {cols} FROM {table}")
    finally:
        await conn.close()
    return {tuple(r[c] for c in ["bucket", *dims]): {m: r[m] for m in measures} for r in rows}


async def wait_for_total(database_url: str, expected: int, timeout: float = 90.0) -> None:
    """Until the consumer has applied exactly `expected` events (and a moment more, to catch extras)."""
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout
        total = 0
        while time.monotonic() < deadline:
            total = await conn.fetchval("SELECT coalesce(sum(count), 0) FROM agg_events_by_type")
            if total >= expected:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        total = await conn.fetchval("SELECT coalesce(sum(count), 0) FROM agg_events_by_type")
        assert total == expected, f"applied {total} events, expected {expected}"
    finally:
        await conn.close()


def exact_json(response: httpx.Response) -> Any:
    return json.loads(response.content, parse_float=Decimal)


def expected_events_by_type(events: list[dict[str, Any]], granularity: str = "minute") -> Rows:
    return {
        k: {"count": v["count"], "sum_properties_amount": v["sum"], "min_properties_amount": v["min"],
            "max_properties_amount": v["max"]}
        for k, v in oracle.events_by_type(events, granularity).items()
    }
