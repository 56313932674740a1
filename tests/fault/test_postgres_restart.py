"""Postgres restarted mid-stream: ingest does not notice, consumers wait it out, queries refuse fast.

A private embedded Postgres (so the restart touches no other test) holds the rollups. Events
stream through a real ingest app (auth off, so ingest needs no Postgres at all) into a Kafka
topic read by two `tally consume` processes, while the query API is asked for uncached totals
(`Cache-Control: no-cache`, so every answer needs Postgres) every 100 ms. Postgres is then shut
down (fast shutdown: sessions are terminated), kept down for a few seconds, and started again.

What must hold:
- ingest: every POST is a 202, before, during and after;
- consumers: no process dies; their batches fail, are retried with backoff (the logs say so)
  and are applied once Postgres is back; stored offsets reach the topic's end;
- query: while Postgres is down every rollup query answers 503 problem+json with Retry-After
  within QUERY_BOUND seconds, `/readyz` is 503 and `/v1/ops/lag` is 503 (not a 500, not a hang);
  no answer at any moment is anything but 200 or 503; soon after the restart it answers 200 again
  and keeps doing so;
- finally the rollup tables, and the query API's totals, equal the oracle's aggregates of exactly
  the events that got a 202.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from core import devstack
from core.migrate import migrate
from core.settings import Settings
from ingest.app import create_app as ingest_app
from query.app import create_app as query_app
from tests.conftest import serve
from tests.fault.support import (
    NO_CACHE,
    ROLLUP,
    TOTALS,
    Ledger,
    Probe,
    answered_totals,
    assert_problem_503,
    assert_rollups_exact,
    consumer_logs,
    expected_totals,
    probe,
    seeded,
    start_consumer,
    streaming,
    topic_ends,
    until,
    wait_caught_up,
)

pytestmark = pytest.mark.fault

CONSUMERS = 2
DOWN_SECONDS = 3.0
QUERY_BOUND = 3.0  # seconds any query may take, Postgres up or down
RECOVERY_BOUND = 10.0  # seconds from Postgres accepting connections to a 200 from the query API


async def hammered(query: httpx.AsyncClient, probes: list[Probe], call: Callable[[], object]) -> float:
    """Run `call` (Postgres's blocking stop or start) in a thread while uncached queries go back to back,
    and a moment more: while the server shuts down or starts up it refuses sessions with its own
    errors (57P01, 57P03), which must be 503s too, not 500s. Returns the seconds `call` took."""
    done = asyncio.Event()

    async def hammer() -> None:
        while not done.is_set():
            probes.append(await probe(query, ROLLUP, params=TOTALS, headers=NO_CACHE))

    task = asyncio.create_task(hammer())
    try:
        started = time.monotonic()
        await asyncio.to_thread(call)
        took = time.monotonic() - started
        await asyncio.sleep(0.2)
    finally:
        done.set()
        await task
    return took


async def test_postgres_restart_mid_stream(
    settings: Settings, private_postgres: devstack.EmbeddedServer, tmp_path: Path
) -> None:
    seed, why = seeded()
    config = settings.model_copy(update={"postgres_url": private_postgres.url})
    await migrate(config)
    procs = list(await asyncio.gather(*(start_consumer(config, tmp_path) for _ in range(CONSUMERS))))
    ledger = Ledger()
    probes: list[Probe] = []
    try:
        async with (
            serve(query_app(config)) as query_url,
            httpx.AsyncClient(base_url=query_url, timeout=30) as query,
        ):
            async with (
                serve(ingest_app(config)) as ingest_url,
                httpx.AsyncClient(base_url=ingest_url, timeout=30) as ingest,
                streaming(ingest, ledger, random.Random(seed), query=query, probes=probes, headers=NO_CACHE),
            ):
                await until(lambda: len(ledger.accepted) >= 20 and len(probes) >= 5, 20, "streaming under way")
                ready_up = await query.get("/readyz")

                stopping = time.monotonic()
                stop_took = await hammered(query, probes, private_postgres.stop)
                down = time.monotonic()
                ready_down = await probe(query, "/readyz")
                lag_down = await probe(query, "/v1/ops/lag")
                await asyncio.sleep(max(0.0, down + DOWN_SECONDS - time.monotonic()))
                starting = time.monotonic()
                start_took = await hammered(query, probes, private_postgres.start)
                up = time.monotonic()

                recovered = await until(
                    lambda: any(p.sent >= up and p.status == 200 for p in probes),
                    RECOVERY_BOUND,
                    "the query API answers 200 again",
                )
                settled = len(ledger.accepted)
                await until(lambda: len(ledger.accepted) >= settled + 20, 20, "streaming goes on")
            # The ingest app is closed (its producer flushed): the topic will not grow any more.
            ends = await topic_ends(config)
            caught_up = await wait_caught_up(config, ends, procs, why, timeout=60)
            final = await probe(query, ROLLUP, params=TOTALS, headers=NO_CACHE)
            ready_again = await query.get("/readyz")
        logs = consumer_logs(tmp_path)
    finally:
        codes = [await asyncio.to_thread(proc.stop) for proc in procs]

    events = ledger.events()
    during = [p for p in probes if p.sent >= down and p.done <= starting]
    after = [p for p in probes if p.sent >= up]
    first_ok = next(i for i, p in enumerate(after) if p.status == 200)
    print(
        f"{why}: {len(events)} events in {len(ledger.batches)} batches; Postgres stopped in {stop_took:.2f} s, "
        f"down {starting - down:.1f} s, started in {start_took:.2f} s; {len(probes)} queries, {len(during)} while "
        f"down "
        f"(slowest {max(p.elapsed for p in during):.3f} s); query answered 200 {recovered:.2f} s after the start; "
        f"caught up {caught_up:.1f} s after the stream ended; {sum(log.count('failed (attempt') for log in logs)} "
        "consumer retries logged"
    )

    # Ingest never noticed.
    assert [a.status for a in ledger.attempts] == [202] * len(ledger.attempts), why
    assert ledger.refused() == [], why
    # Queries: 200 before, a fast 503 problem while down, never anything else, never slow.
    assert ready_up.status_code == 200 and ready_again.status_code == 200, why
    assert all(p.status in (200, 503) and p.elapsed < QUERY_BOUND for p in probes), (why, probes)
    assert all(p.status == 200 for p in probes if p.done <= stopping), why
    assert len(during) >= 5, (why, probes)
    assert_problem_503(during, QUERY_BOUND, why)
    assert ready_down.status == 503 and ready_down.elapsed < QUERY_BOUND, (why, ready_down)
    assert_problem_503([lag_down], QUERY_BOUND, why)
    assert all(p.status == 200 for p in after[first_ok:]), (why, after)
    # Consumers waited Postgres out with retries, none died, and every one stopped cleanly.
    assert any("failed (attempt" in log for log in logs), why
    assert codes == [0] * CONSUMERS, why
    # Exact counts, in the tables and through the query API.
    await assert_rollups_exact(config, events, why)
    assert final.status == 200, (why, final)
    assert answered_totals(final.body) == expected_totals(events), why
