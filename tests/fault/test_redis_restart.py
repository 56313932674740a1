"""Redis killed (SIGKILL) and restarted mid-stream: each feature that uses it behaves as README says.

A private Valkey (so the kill touches no other test) serves ingest's idempotency store and rate
limiter and the query cache. Batches stream through a real ingest app, every third with an
Idempotency-Key, into a topic read by a `tally consume` process (with event_id de-duplication,
`TALLY_DEDUP=true`), while the query API's totals are polled through the cache every 100 ms.

What must hold (README: Idempotency keys, Rate limits, Cache):
- while Redis is down, a request with an Idempotency-Key is refused with a fast 503 problem
  (Retry-After, "idempotency store cannot be reached") and writes nothing; a request without one
  is accepted, and the rate limiter fails open: no RateLimit-* headers, and a batch larger than
  the key's whole burst, refused with 429 while Redis is up, is accepted;
- queries answer 200 from Postgres (`X-Cache: bypass`) without waiting on Redis, with exact
  data (checked at a quiet moment, once the consumer has caught up);
- after the restart, keyed requests are accepted again and caching resumes by itself;
  a refused keyed batch retried with its key is written (its 503 was not kept), then replayed;
- Valkey here keeps nothing on disk, so the restart forgets the stored answers: a batch answered
  202 before the kill and retried after is written again, not replayed. Its events carry the same
  event ids (their own, or derived from the key), so de-duplication counts them once;
- finally the rollups, and the query API's totals, equal the oracle's aggregates of exactly the
  batches that got a 2xx, each once.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
import pytest

from core import devstack
from core.migrate import migrate
from core.settings import Settings
from ingest.app import create_app as ingest_app
from query.app import create_app as query_app
from tests import oracle
from tests.conftest import serve
from tests.fault.support import (
    NO_CACHE,
    ROLLUP,
    TOTALS,
    Attempt,
    Ledger,
    Probe,
    answered_totals,
    assert_problem_503,
    assert_rollups_exact,
    expected_totals,
    keyed_every,
    now_ms,
    probe,
    seeded,
    seen_ids,
    send,
    start_consumer,
    streaming,
    topic_ends,
    until,
    wait_caught_up,
)
from tests.integration.query_support import sample

pytestmark = pytest.mark.fault

RATE = 1_000  # events/s per key; burst 2 s: a bucket of 2,000 events
OVERSIZED = 2_500  # events in one batch: more than the whole bucket
REFUSAL_BOUND = 1.5  # seconds for a keyed request to be refused while Redis is down
QUERY_BOUND = 2.0  # seconds for a query while Redis is down (no Redis timeout per request)


def limited(a: Attempt) -> bool:
    return "ratelimit-limit" in a.headers


async def test_redis_killed_and_restarted_mid_stream(
    settings: Settings, private_redis: devstack.EmbeddedServer, tmp_path: Path
) -> None:
    seed, why = seeded()
    rng = random.Random(seed)
    config = settings.model_copy(
        # No rate-limit leases: a post right after the kill must meet Redis gone, not a lease that
        # still has tokens (ingest.ratelimit), so every post while it is down shows the limiter open.
        # The in-process cache tier is off: this is the Redis tier's fallback (an entry from before
        # any version, on its timer, would rightly still be served from memory for a few seconds;
        # tests/integration/test_query_local_cache.py covers that tier with Redis down).
        update={
            "redis_url": private_redis.url, "dedup": True, "rate_limit_events_per_second": RATE,
            "rate_limit_lease_seconds": 0.0, "query_local_cache_mb": 0,
        }
    )
    await migrate(config)
    consumer = await start_consumer(config, tmp_path)
    ledger = Ledger()
    probes: list[Probe] = []
    keys = keyed_every(3, f"redis-{seed}")
    try:
        async with (
            serve(query_app(config)) as query_url,
            httpx.AsyncClient(base_url=query_url, timeout=30) as query,
        ):
            async with (
                serve(ingest_app(config)) as ingest_url,
                httpx.AsyncClient(base_url=ingest_url, timeout=30) as ingest,
            ):
                oversized = ledger.new(oracle.make_events(rng, OVERSIZED, now_ms()))
                async with streaming(ingest, ledger, rng, key=keys, query=query, probes=probes):
                    await until(lambda: len(ledger.accepted) >= 15, 20, "streaming under way")
                    over_limit = await send(ingest, ledger, oversized)
                    first_keyed = min(i for i in ledger.accepted if ledger.batches[i].key)
                    replayed = await send(ingest, ledger, first_keyed)  # its answer is replayed

                    opened_before = sample("tally_ingest_rate_limit_unavailable_total", {})
                    killed = time.monotonic()
                    private_redis.kill()
                    await until(lambda: len(ledger.between(killed, time.monotonic())) >= 15, 20, "posts while down")
                ends = await topic_ends(config)
                await wait_caught_up(config, ends, [consumer], why)
                quiet = await probe(query, ROLLUP, params=TOTALS)
                quiet_events = ledger.events()
                fail_open = await send(ingest, ledger, oversized)

                async with streaming(ingest, ledger, rng, key=keys, query=query, probes=probes):
                    await until(lambda: len(ledger.between(killed, time.monotonic())) >= 25, 20, "posts while down")
                    opened = sample("tally_ingest_rate_limit_unavailable_total", {}) - opened_before
                    restarting = time.monotonic()
                    private_redis.start()  # the same port, empty
                    restarted = time.monotonic()
                    await until(
                        lambda: any(a.key and a.status == 202 and a.sent >= restarted for a in ledger.attempts),
                        10,
                        "keyed batches are accepted again",
                    )
                    cached_again = await until(
                        lambda: any(p.sent >= restarted and p.headers.get("x-cache") == "hit" for p in probes),
                        10,
                        "the query cache serves hits again",
                    )
                refused_keyed = [i for i in ledger.refused() if ledger.batches[i].key]
                retried = [await send(ingest, ledger, i) for i in refused_keyed]
                replays = [await send(ingest, ledger, i) for i in refused_keyed]
                forgotten = await send(ingest, ledger, first_keyed)  # answered before the kill; Redis forgot it
            ends = await topic_ends(config)
            caught_up = await wait_caught_up(config, ends, [consumer], why)
            final = await probe(query, ROLLUP, params=TOTALS, headers=NO_CACHE)
    finally:
        code = consumer.stop()

    events = ledger.events()
    before = [a for a in ledger.attempts if a.done <= killed]
    down = ledger.between(killed, restarting)
    down_keyed = [a for a in down if a.key]
    down_plain = [a for a in down if not a.key]
    probes_down = [p for p in probes if p.sent >= killed and p.done <= restarting]
    print(
        f"{why}: {len(events)} events in {len(ledger.accepted)} accepted batches; while Redis was down "
        f"{len(down_keyed)} keyed posts refused (slowest {max(a.elapsed for a in down_keyed):.3f} s), "
        f"{len(down_plain)} plain posts accepted, {len(probes_down)} queries bypassed the cache (slowest "
        f"{max(p.elapsed for p in probes_down):.3f} s); cache hits again {cached_again:.2f} s after the restart; "
        f"caught up in {caught_up:.1f} s"
    )

    # Redis up: every post accepted with RateLimit-* headers, except the batch larger than the burst.
    assert over_limit.status == 429 and limited(over_limit), (why, over_limit)
    assert replayed.status == 202 and replayed.headers.get("idempotent-replayed") == "true", (why, replayed)
    assert all(a.status == 202 and limited(a) for a in before if a is not over_limit and a is not replayed), why
    # Redis down: keyed refused fast (nothing written), plain accepted without limits, the limiter open.
    assert len(down_keyed) >= 5 and len(down_plain) >= 10, (why, down)
    assert_problem_503(down_keyed, REFUSAL_BOUND, why)
    assert all("idempotency store cannot be reached" in a.problem()["detail"] for a in down_keyed), why
    assert all(a.status == 202 and not limited(a) for a in down_plain), (why, down_plain)
    assert fail_open.status == 202 and not limited(fail_open), (why, fail_open)
    assert opened >= len(down_plain), (why, opened)  # each let through, and counted
    # Queries while down: from Postgres, promptly, exact at a quiet moment.
    assert len(probes_down) >= 5, (why, probes)
    assert all(p.status == 200 and p.headers["x-cache"] == "bypass" for p in probes_down), (why, probes_down)
    assert all(p.elapsed < QUERY_BOUND for p in probes_down), (why, probes_down)
    assert quiet.status == 200 and quiet.headers["x-cache"] == "bypass", (why, quiet)
    assert answered_totals(quiet.body) == expected_totals(quiet_events), why
    assert all(p.status == 200 for p in probes), why
    # After the restart: refused keys are written on retry, then replayed; a forgotten key is written again.
    assert refused_keyed and all(a.status == 202 and "idempotent-replayed" not in a.headers for a in retried), why
    assert all(a.status == 202 and a.headers.get("idempotent-replayed") == "true" for a in replays), why
    assert forgotten.status == 202 and "idempotent-replayed" not in forgotten.headers, (why, forgotten)
    assert ledger.refused() == [], why
    # Exact counts: every accepted batch once (the forgotten one de-duplicated by its event ids).
    assert code == 0, why
    await assert_rollups_exact(config, events, why)
    assert await seen_ids(config) == len(events), why
    assert final.status == 200, (why, final)
    assert answered_totals(final.body) == expected_totals(events), why
