"""`tally backup` / `tally restore` on real Postgres and Kafka, taken while a consumer is applying batches.

The backup's rollups must be exactly the aggregates of the records before its offsets (one snapshot);
restored into a new database, a consumer resumes from those offsets and ends with exact counts.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy.engine import make_url

from core.auth import KeyStore
from core.backup import BackupError, backup, find_tool
from core.db import write_engine
from core.settings import Settings
from schemas.envelope import headers as envelope_headers
from tests.integration.consumer_helpers import (
    consumer_settings,
    envelopes,
    expected_tables,
    make_events,
    running,
    stored_offsets,
    table,
    wait_for_offsets,
)
from tests.servers import Servers

pytestmark = pytest.mark.integration

Position = tuple[int, int]  # (partition, offset)
REGISTRY = ("tally_rollups", "tally_meta", "tally_rollup_starts", "tally_api_keys")


async def send(settings: Settings, values: Sequence[bytes], first: int) -> list[Position]:
    """Records round-robin over 4 partitions (acks=all); where each one landed."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        futures = [
            await producer.send(
                settings.topic, v, partition=(first + i) % 4, headers=envelope_headers(uuid.uuid4().hex)
            )
            for i, v in enumerate(values)
        ]
        metas = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metas]


async def tally(settings: Settings, *args: str) -> tuple[int, str]:
    """`tally <args>` as an operator runs it: its own process, configured by TALLY_* variables."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "core.cli", *args, env=settings.process_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return int(proc.returncode or 0), out.decode()


async def rows(url: str, name: str) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return sorted((tuple(r.values()) for r in await conn.fetch(f'SELECT * FROM "{name}"')), key=repr)
    finally:
        await conn.close()


async def test_backup_mid_stream_restores_a_consistent_snapshot_and_replay_is_exact(
    servers: Servers, migrated: Settings, tmp_path: Path
) -> None:
    # Small batches: many transactions. A short session: Tansu ignores LeaveGroup, so the consumer on the
    # restored database waits that long for the first one's partitions.
    settings = consumer_settings(migrated, batch_max_records=3, session_timeout_ms=3_000, heartbeat_interval_ms=300)
    url = str(settings.postgres_url)
    store = KeyStore(write_engine(url, pool_size=1, app="test"), cache_seconds=0)
    await store.create("grafana", ["query"], rate_limit=50)
    await store.close()
    rng = random.Random(12)
    sent: dict[Position, list[dict[str, Any]]] = {}  # each record's events, by where it landed
    producing = asyncio.Event()
    producing.set()

    async def wave() -> None:
        encoded = make_events(40, rng)
        values = envelopes(encoded, 5)
        for position, value in zip(await send(settings, values, len(sent)), values, strict=True):
            sent[position] = orjson.loads(value)["events"]

    async def producer() -> None:
        while producing.is_set():
            await wave()
            await asyncio.sleep(0.05)

    directory = tmp_path / "backup"
    async with running(settings) as (_, task):
        load = asyncio.create_task(producer())
        # The consumer is well under way: every partition has started (so the snapshot's registry holds
        # every rollup start the original will) and 20 records are applied.
        while True:
            offsets = await stored_offsets(settings)
            if sum(offsets.values()) >= 20 and len([o for o in offsets.values() if o]) == 4:  # `send`: 4 partitions
                break
            assert not task.done() and not load.done()
            await asyncio.sleep(0.05)
        code, out = await tally(settings, "backup", str(directory))  # while records flow and batches commit
        assert code == 0, out
        producing.clear()
        await load
        await wave()  # and some more once the backup is done
        ends: dict[int, int] = {}
        for partition, offset in sent:
            ends[partition] = max(ends.get(partition, 0), offset + 1)
        await wait_for_offsets(settings, ends, [task])
    final = {name: await table(settings, name) for name in ("agg_events_by_type", "agg_page_views")}
    every_event = [e for position in sorted(sent) for e in sent[position]]
    assert final == expected_tables(every_event)

    manifest = json.loads((directory / "tally-backup.json").read_text())
    group = settings.consumer_group
    snapshot = {o["partition"]: o["next_offset"] for o in manifest["offsets"] if o["group_id"] == group}
    assert 0 < sum(snapshot.values()) < sum(ends.values())  # taken mid-stream, not after the last record
    with pytest.raises(BackupError, match="not empty"):
        await backup(settings, directory)

    # Restoring over live data would double-count: refused, nothing changed (--create only makes a
    # database that does not exist).
    code, out = await tally(settings, "restore", str(directory), "--create")
    assert code == 1 and "already has tables" in out, out
    assert await stored_offsets(settings) == ends

    admin = make_url(servers.postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"tally_restored_{uuid.uuid4().hex[:10]}"
    restored_url = make_url(admin).set(database=name).render_as_string(hide_password=False)
    restored = Settings(**{**settings.model_dump(), "postgres_url": restored_url})
    try:
        code, out = await tally(restored, "restore", str(directory), "--create")  # a database of its own
        assert code == 0, out
        assert "row counts checked" in out and "warning:" not in out, out  # Kafka still has every record

        # One snapshot: the restored offsets and rollups agree exactly, record for record.
        assert await stored_offsets(restored) == snapshot
        applied = [e for (p, o), events in sorted(sent.items()) if o < snapshot.get(p, 0) for e in events]
        at_snapshot = {n: await table(restored, n) for n in ("agg_events_by_type", "agg_page_views")}
        assert at_snapshot == expected_tables(applied)
        assert at_snapshot != final  # so the replay below has work to do
        for registry_table in REGISTRY:
            assert await rows(restored_url, registry_table) == await rows(url, registry_table), registry_table

        # A consumer on the restored database resumes from its offsets; Kafka still has the rest.
        resumed = consumer_settings(restored)
        async with running(resumed) as (_, task):
            await wait_for_offsets(resumed, ends, [task])
        assert await stored_offsets(restored) == ends
        assert {n: await table(restored, n) for n in final} == final
    finally:
        conn = await asyncpg.connect(admin)
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


def test_the_dump_tool_is_one_the_server_accepts() -> None:
    """pg_dump refuses servers newer than itself: the one chosen is at least the server's major."""
    settings = Settings(env="test")
    tool = find_tool("pg_dump", 15, settings)
    assert tool.major >= 15 and tool.path.is_file()
    with pytest.raises(BackupError, match="no pg_dump of PostgreSQL 99"):
        find_tool("pg_dump", 99, settings)
