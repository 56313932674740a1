"""A Postgres restart under a running consumer: it waits, retries the batch, and the totals stay exact."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest

from core.settings import Settings
from tests.integration.consumer_helpers import (
    assert_tables_match,
    consumer_settings,
    envelopes,
    make_events,
    produce,
    running,
    stored_offsets,
    wait_for_offsets,
)
from tests.servers import Servers

pytestmark = pytest.mark.integration


async def test_consumer_survives_a_postgres_restart(servers: Servers, migrated: Settings) -> None:
    postgres = servers.embedded.get("postgres")
    if postgres is None:
        pytest.skip("needs the embedded Postgres (TALLY_TEST_POSTGRES_URL points elsewhere)")
    settings = consumer_settings(migrated, batch_max_records=3)
    rng = random.Random(6)
    first = make_events(200, rng)
    ends = await produce(settings, [(i % 4, v) for i, v in enumerate(envelopes(first, 4))])

    async with running(settings) as (_, task):
        await wait_for_offsets(settings, ends, [task])
        await asyncio.to_thread(postgres.stop)
        try:
            second = make_events(200, rng)
            more = await produce(settings, [(i % 4, v) for i, v in enumerate(envelopes(second, 4))])
            await asyncio.sleep(2.0)  # the consumer polls, fails to flush, backs off
            assert not task.done()
        finally:
            await asyncio.to_thread(postgres.start)
        await wait_for_offsets(settings, more, [task], timeout=90)

    assert await stored_offsets(settings) == more
    await assert_tables_match(settings, [orjson.loads(e) for e in first + second])
