"""A rollup added later: consumers on the old rollups file are fenced, the new consumers
apply it from a recorded start, and `tally backfill` fills exactly the past before it."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from consumers.main import run
from consumers.registry import StaleRollups
from core.migrate import migrate
from core.settings import Settings
from tests.integration.consumer_helpers import (
    consumer_settings,
    envelopes,
    make_events,
    produce,
    running,
    spread,
    wait_for_offsets,
)

pytestmark = pytest.mark.integration

BY_TYPE = '[[rollup]]\nname = "by_type"\ndimensions = ["type"]\nmeasures = ["count"]\n'
BY_SOURCE = '[[rollup]]\nname = "by_source"\ndimensions = ["source"]\nmeasures = ["count"]\n'


async def counts(settings: Settings, table: str, column: str) -> dict[str, int]:
    conn = await asyncpg.connect(settings.postgres_url)
    try:
        rows = await conn.fetch(f'SELECT "{column}" AS k, sum(count) AS n FROM {table} GROUP BY 1')
    finally:
        await conn.close()
    return {r["k"]: int(r["n"]) for r in rows}


def expected(events: list[dict[str, Any]], field: str) -> dict[str, int]:
    return dict(Counter(e.get(field, "") for e in events))


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = settings.process_env()
    return subprocess.run([sys.executable, "-m", "core.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


async def test_a_new_rollup_is_fenced_applied_and_backfilled_exactly(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "old.toml").write_text(BY_TYPE)
    (tmp_path / "new.toml").write_text(BY_TYPE + BY_SOURCE)
    old = consumer_settings(settings, rollups_file=tmp_path / "old.toml")
    new = consumer_settings(settings, rollups_file=tmp_path / "new.toml")
    rng = random.Random(5)
    await migrate(old)

    # Before the new rollup exists, a consumer on the old rollups file applies the first events.
    first = make_events(400, rng)
    ends = await produce(old, spread(envelopes(first, 10), old.topic_partitions))
    stop = asyncio.Event()
    old_consumer = asyncio.create_task(run(old, stop=stop))
    await wait_for_offsets(old, ends, [old_consumer])

    # by_source is migrated while it still runs: its next batch is fenced and it stops.
    await migrate(new)
    during = make_events(10, rng)
    await produce(old, spread(envelopes(during, 10), 1))
    with pytest.raises(StaleRollups, match="lacks by_source"):
        await asyncio.wait_for(old_consumer, 30)
    # An old consumer started now refuses at once, and `tally consume` says so with exit status 3.
    with pytest.raises(StaleRollups):
        await asyncio.wait_for(run(consumer_settings(old), stop=asyncio.Event()), 30)
    stale = cli(consumer_settings(old), "consume")
    assert stale.returncode == 3 and "deploy the rollups file" in stale.stderr

    # Consumers on the new file apply both rollups from here on, recording where by_source started.
    second = make_events(300, rng)
    ends = await produce(new, spread(envelopes(second, 10), new.topic_partitions))
    events = [orjson.loads(e) for e in [*first, *during, *second]]
    async with running(new) as (_, task):
        await wait_for_offsets(new, ends, [task])
        assert await counts(new, "agg_by_type", "type") == expected(events, "type")  # nothing lost, nothing twice
        before = await counts(new, "agg_by_source", "source")
        assert sum(before.values()) == 310  # only what came after its start

        result = cli(new, "backfill", "by_source", "--from", "earliest")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "backfilled by_source: 400 events applied" in result.stdout
        again = cli(new, "backfill", "by_source", "--since", "-1h")  # `--since`: `--from` by its other name
        assert again.returncode == 0 and "0 events applied" in again.stdout, again.stdout + again.stderr

    assert await counts(new, "agg_by_source", "source") == expected(events, "source")
    assert await counts(new, "agg_by_type", "type") == expected(events, "type")


async def test_backfill_refuses_an_unknown_rollup_and_a_bad_from(migrated: Settings) -> None:
    unknown = cli(migrated, "backfill", "nope")
    assert unknown.returncode == 1 and "tally backfill: rollup 'nope' is not in" in unknown.stderr
    bad = cli(migrated, "backfill", "events_by_type", "--from", "last tuesday")
    assert bad.returncode == 1 and "is not earliest, ISO 8601 with an offset or relative like -30s" in bad.stderr
    future = cli(migrated, "backfill", "events_by_type", "--since", "+1h")
    assert future.returncode == 1 and "in the future" in future.stderr
