"""The answer to a keyed batch is stored through a Redis blip, on a private Valkey.

Once a batch is in Kafka, its answer must reach Redis, or a retry with the same key writes
the batch again after the claim expires. `CLIENT PAUSE ... WRITE` holds every write for a
moment (as a failover or a saturated Redis does): the first SET times out (0.5 s socket
timeout), a later one lands, and the retry is a replay. A pause longer than the store's
retries gives up, counts it, and leaves the claim to expire, as README says.
"""

from __future__ import annotations

import time
import uuid

import pytest
from prometheus_client import REGISTRY

from core import devstack
from core.cache import redis_client
from ingest.idempotency import STORE_SECONDS, IdempotencyConflict, IdempotencyStore, StoredResponse

pytestmark = pytest.mark.fault


def failures() -> float:
    return REGISTRY.get_sample_value("tally_ingest_idempotency_store_failures_total") or 0.0


async def test_the_answer_is_stored_through_a_pause_and_given_up_after_a_long_one(
    private_redis: devstack.EmbeddedServer,
) -> None:
    redis = redis_client(private_redis.url)
    admin = redis_client(private_redis.url)
    store = IdempotencyStore(redis, f"t-{uuid.uuid4().hex[:8]}:", ttl_seconds=60, lock_seconds=30, retry_after=1)
    try:
        claim = await store.claim("key-1", "batch-1", "fp")
        assert not isinstance(claim, StoredResponse)
        before = failures()
        await admin.execute_command("CLIENT", "PAUSE", "1000", "WRITE")
        started = time.monotonic()
        await store.complete(claim, 202, b'{"accepted":2,"rejected":[]}')
        took = time.monotonic() - started
        assert 1.0 <= took < STORE_SECONDS + 0.6, took  # waited out the pause, within the bound
        assert await store.claim("key-1", "batch-1", "fp") == StoredResponse(202, b'{"accepted":2,"rejected":[]}')
        assert failures() == before

        claim = await store.claim("key-1", "batch-2", "fp")
        assert not isinstance(claim, StoredResponse)
        await admin.execute_command("CLIENT", "PAUSE", str(int((STORE_SECONDS + 1.5) * 1000)), "WRITE")
        started = time.monotonic()
        await store.complete(claim, 202, b'{"accepted":1,"rejected":[]}')
        took = time.monotonic() - started
        assert STORE_SECONDS - 0.5 <= took < STORE_SECONDS + 1.0, took
        assert failures() == before + 1
        await admin.execute_command("CLIENT", "UNPAUSE")
        with pytest.raises(IdempotencyConflict):  # still claimed: a retry waits for the claim to expire
            await store.claim("key-1", "batch-2", "fp")
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await redis.aclose()
        await admin.aclose()
