"""The broker stalls mid-stream: ingest refuses fast with 503 + Retry-After, recovers by itself, and
every event acknowledged before the stall is counted; retried refusals count once.

A private Tansu broker is frozen with SIGSTOP while batches stream through a real ingest app
(produce deadline 2 s, breaker 1 s) into a topic read by a `tally consume` process with
event_id de-duplication on; every event carries its own event_id, as a careful SDK sends them.
After STALL_SECONDS the broker is thawed (SIGCONT). A frozen broker is what a hung or
partitioned broker looks like to a client: connections stay open and nothing answers, which
is the harder case for a deadline (a stopped broker refuses connections at once).

What must hold:
- during the stall every POST ends within the produce deadline plus a margin with a 503
  problem+json and Retry-After; once a write timed out the breaker refuses the following ones
  at once (only one request per breaker period waits a deadline); `/readyz` is 503;
- after the thaw ingest accepts again within RECOVERY_BOUND seconds, without a restart;
- the topic then holds every event that got a 202 (those acknowledged before the stall
  included), none of a batch refused before it was sent (breaker open), and possibly the events
  of a batch whose 503 came from the deadline: that answer is ambiguous, as README says, since
  the broker may write the records once it answers again; the rollups equal the oracle's
  aggregates of exactly the distinct events in the topic;
- every refused batch, retried with the same events after the thaw, gets a 202, and the rollups
  then equal the aggregates of exactly the accepted batches, each counted once (duplicates of an
  ambiguous write are dropped by event_id).

What this cannot show, because Tansu keeps its log in memory only (guarantees that need a
durable broker, i.e. real Kafka with replication.factor >= 3, min.insync.replicas >= 2 and the
producer's acks=all):
- that a 202 survives the broker crashing or restarting (a Tansu restart starts from an empty
  log, so "acknowledged before the stop" can only be shown across a stall, not a restart);
- that consumers resume at their stored offsets after a broker restart (the new log is shorter
  than the stored offsets; `tally dev` forgets them for that reason);
- leader fail-over without loss (no replicas here), and an idempotent producer
  (TALLY_KAFKA_IDEMPOTENCE, which Tansu cannot do) keeping the broker's own retries from
  writing a record twice; here such duplicates are dropped by event_id de-duplication instead.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from core import devstack
from core.migrate import migrate
from core.settings import Settings
from ingest.app import create_app as ingest_app
from tests.conftest import serve
from tests.fault.support import (
    Attempt,
    Ledger,
    assert_problem_503,
    assert_rollups_exact,
    deliver,
    probe,
    seeded,
    seen_ids,
    start_consumer,
    streaming,
    topic_ends,
    until,
    wait_caught_up,
)
from tests.kafka_read import read_topic

pytestmark = pytest.mark.fault

PRODUCE_TIMEOUT = 2.0
BREAKER = 1.0  # long enough that several posts meet the open breaker, even on a loaded machine
STALL_SECONDS = 4.0
REFUSAL_BOUND = PRODUCE_TIMEOUT + 1.5  # the longest any POST may take while the broker is frozen
FAST = 0.5  # a refusal by the open breaker
RECOVERY_BOUND = 10.0


def ambiguous(a: Attempt) -> bool:
    """A 503 after the deadline: the records were handed to the producer and may be written later."""
    return a.status == 503 and "did not acknowledge" in a.problem()["detail"]


async def test_broker_stalled_mid_stream(
    settings: Settings, private_broker: devstack.EmbeddedServer, tmp_path: Path
) -> None:
    seed, why = seeded()
    rng = random.Random(seed)
    config = settings.model_copy(
        update={
            "kafka_bootstrap": private_broker.url,
            "produce_timeout_seconds": PRODUCE_TIMEOUT,
            "kafka_breaker_seconds": BREAKER,
            "dedup": True,
        }
    )
    await migrate(config)  # the topics on the private broker, the tables in the test's database
    consumer = await start_consumer(config, tmp_path)
    broker = private_broker.process
    assert broker is not None
    ledger = Ledger()
    try:
        async with (
            serve(ingest_app(config)) as ingest_url,
            httpx.AsyncClient(base_url=ingest_url, timeout=30) as ingest,
        ):
            async with streaming(ingest, ledger, rng, ids=True):
                await until(lambda: len(ledger.accepted) >= 20, 20, "streaming under way")
                frozen = time.monotonic()
                broker.send_signal(signal.SIGSTOP)
                acked_before = set(ledger.accepted)
                try:
                    await asyncio.sleep(0.2)
                    ready_frozen = await probe(ingest, "/readyz")
                    await asyncio.sleep(max(0.0, frozen + STALL_SECONDS - time.monotonic()))
                finally:
                    thawed = time.monotonic()
                    broker.send_signal(signal.SIGCONT)
                recovered = await until(
                    lambda: any(a.sent >= thawed and a.status == 202 for a in ledger.attempts),
                    RECOVERY_BOUND,
                    "ingest accepts again",
                )
                settled = len(ledger.accepted)
                await until(lambda: len(ledger.accepted) >= settled + 10, 20, "streaming goes on")
            ready_again = await ingest.get("/readyz")
        # Ingest closed (its producer flushed or gave up): whatever reached the topic is there now.
        ends = await topic_ends(config)
        in_topic = await read_topic(config.kafka_bootstrap or "", config.topic, expect_events=len(ledger.events()))
        await wait_caught_up(config, ends, [consumer], why)
        distinct: dict[str, dict[str, object]] = {}
        for event, _ in in_topic:
            distinct.setdefault(str(event["event_id"]), event)
        written = {i for i, b in enumerate(ledger.batches) if b.events[0]["event_id"] in distinct}
        await assert_rollups_exact(
            config, [e for i in sorted(written) for e in ledger.batches[i].events], f"{why}: before the retries"
        )

        accepted = set(ledger.accepted)  # before the retries
        refused = ledger.refused()
        async with (
            serve(ingest_app(config)) as ingest_url,
            httpx.AsyncClient(base_url=ingest_url, timeout=30) as ingest,
        ):
            retries = [await deliver(ingest, ledger, i) for i in refused]  # the new app connects first
        ends = await topic_ends(config)
        await wait_caught_up(config, ends, [consumer], why)
    finally:
        code = consumer.stop()

    events = ledger.events()
    stalled = ledger.between(frozen, thawed)
    slow = [a for a in stalled if a.elapsed >= FAST]
    maybe = {a.batch for a in ledger.attempts if a.status == 503 and ambiguous(a)}
    copies = Counter(str(e["event_id"]) for e, _ in in_topic)
    print(
        f"{why}: {len(ledger.batches)} batches of 40 events; {len(stalled)} posts during the {STALL_SECONDS} s "
        f"stall, {len(slow)} of them waited a deadline (slowest {max(a.elapsed for a in stalled):.2f} s), the "
        f"others were refused in at most {max((a.elapsed for a in stalled if a.elapsed < FAST), default=0):.3f} s; "
        f"accepted again {recovered:.2f} s after the thaw; {len(refused)} batches refused, {len(maybe)} "
        f"ambiguously, {len(written & maybe)} of those written anyway; "
        f"{sum(copies.values()) - len(copies)} duplicate events in the topic"
    )

    # While frozen: every POST a 503 problem with Retry-After within the bound, most at once.
    assert len(stalled) >= 5, (why, stalled)
    assert_problem_503(stalled, REFUSAL_BOUND, why)
    assert len(slow) <= STALL_SECONDS / (PRODUCE_TIMEOUT + BREAKER) + 1, (why, slow)
    assert len(stalled) - len(slow) >= 3, (why, stalled)
    assert ready_frozen.status == 503, (why, ready_frozen)
    assert ready_again.status_code == 200, why
    # Before any retry: the topic holds every 202 (before the stall included) and nothing refused unsent.
    assert acked_before <= accepted <= written, why
    assert written - accepted <= maybe, why
    assert len(distinct) == sum(len(ledger.batches[i].events) for i in written), why
    # After the retries: every batch accepted once, counted once.
    assert refused and all(tries[-1].status == 202 for tries in retries), (why, retries)
    assert ledger.refused() == [], why
    assert code == 0, why
    await assert_rollups_exact(config, events, why)
    assert await seen_ids(config) == len(events), why
