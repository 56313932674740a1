"""`tally dlq inspect` and `tally dlq replay` as an operator runs them, against real servers.

Dead letters are made the real way (garbage records and invalid events through a
consumer). The replayed-after-a-fix case is an envelope of valid events that a
stricter, older consumer had dead-lettered: written to the DLQ directly, with the
headers such a consumer writes.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from core.settings import Settings
from schemas.envelope import ERROR_HEADER, SCHEMA_HEADER, pack
from tests.integration.consumer_helpers import (
    assert_tables_match,
    consumer_settings,
    envelopes,
    make_events,
    now_ms,
    produce,
    running,
    stored_offsets,
    wait_for_offsets,
)

pytestmark = pytest.mark.integration


async def tally(settings: Settings, *args: str) -> tuple[int, str, str]:
    """`tally <args>` in a child process configured by TALLY_* variables only."""
    env = settings.process_env()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "core.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def read_records(settings: Settings, topic: str, at_least: int, timeout: float = 30.0) -> list[Any]:
    """Every record of `topic`, after at least `at_least` arrived and one more quiet poll."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = [r for rs in (await consumer.getmany(timeout_ms=300)).values() for r in rs]
            out.extend(records)
            if not records and len(out) >= at_least:
                break
    finally:
        await consumer.stop()
    return sorted(out, key=lambda r: (r.partition, r.offset))


async def replay_positions(settings: Settings) -> dict[int, int]:
    conn = await asyncpg.connect(str(settings.postgres_url))
    try:
        rows = await conn.fetch("SELECT partition, next_offset FROM tally_offsets WHERE group_id = $1 AND topic = $2",
                                "tally-dlq-replay", settings.dlq_topic)
    finally:
        await conn.close()
    return {r["partition"]: r["next_offset"] for r in rows}


async def test_inspect_shows_dead_letters_and_replay_counts_fixed_ones_exactly_once(migrated: Settings) -> None:
    settings = consumer_settings(migrated, batch_max_records=3)
    rng = random.Random(21)
    good = make_events(30, rng)
    invalid = [{"type": "no_ts"}, "not an object"]
    garbage = [b"not json at all", b'{"v":2,"events":[]}']
    mixed = next(pack([*good[:2], orjson.dumps(invalid[0]), good[2], orjson.dumps(invalid[1])], 1 << 30))
    records = [(i % 4, v) for i, v in enumerate(envelopes(good[3:], 9))]
    records += [(1, mixed), (2, garbage[0]), (3, garbage[1])]
    ends = await produce(settings, records)
    async with running(settings) as (_, task):
        await wait_for_offsets(settings, ends, [task])

    # inspect: every dead letter with its reason and origin (JSON lines), and the human form.
    code, out, err = await tally(settings, "dlq", "inspect", "--json")
    assert code == 0, err
    letters = [orjson.loads(line) for line in out.splitlines()]
    assert len(letters) == 4
    assert all(x["source_topic"] == settings.topic for x in letters)
    by_source = {(int(x["source_partition"]), int(x["source_offset"])): x for x in letters}
    mixed_at = (1, ends[1] - 1)  # each of those three records was the last of its partition
    assert sorted(by_source) == sorted([mixed_at, (2, ends[2] - 1), (3, ends[3] - 1)])
    assert sorted(x["error"].split(":")[0] for x in letters) == [
        "event is not a JSON object",
        "record is not JSON",  # and the parser's words for why
        "record is not a version 1 envelope",
        "ts is missing or not epoch milliseconds (an integer)",
    ]
    assert {x["value_preview"] for x in letters} >= {"not json at all", '{"v":2,"events":[]}'}
    assert all(x["replay_of"] is None for x in letters)

    code, out, err = await tally(settings, "dlq", "inspect", "--limit", "2")
    assert code == 0, err
    assert out.startswith(f"{settings.dlq_topic}: 4 dead letter(s); the last 2, oldest first\n")
    assert out.count("    error: ") == 2 and out.count(f"from {settings.topic}[") == 2
    code, out, err = await tally(settings, "dlq", "inspect", "--since", "+1h")
    assert code == 1 and "in the future" in err  # not a time it can place: an error, not an empty list

    # An older, stricter consumer had dead-lettered an envelope of valid events.
    fixed = make_events(3, rng)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(settings.dlq_topic, next(pack(fixed, 1 << 30)), partition=0, headers=[
            (SCHEMA_HEADER, b"1"), ("tally-request-id", uuid.uuid4().hex.encode()),
            (ERROR_HEADER, b"properties.amount must be an integer (tally 0.0.9)"),
            ("tally-source-topic", settings.topic.encode()), ("tally-source-partition", b"0"),
            ("tally-source-offset", b"0"),
        ])
    finally:
        await producer.stop()

    code, out, err = await tally(settings, "dlq", "replay", "--dry-run")
    assert code == 0, err
    assert out.splitlines()[-1].startswith(f"would replay 5 dead letter(s) from {settings.dlq_topic}")
    assert out.count("    error: ") == 5
    assert await replay_positions(settings) == {}  # a dry run changes nothing

    code, out, err = await tally(settings, "dlq", "replay")
    assert code == 0, err
    assert out.startswith(f"replayed 5 dead letter(s) from {settings.dlq_topic} to {settings.topic}")
    dlq_ends = {r.partition: r.offset + 1 for r in await read_records(settings, settings.dlq_topic, 5)}
    assert await replay_positions(settings) == {p: dlq_ends.get(p, 0) for p in range(4)}
    main = await read_records(settings, settings.topic, len(records) + 5)
    assert len(main) == len(records) + 5
    replayed = [r for r in main if "tally-replay-of" in dict(r.headers)]
    assert len(replayed) == 5
    assert all(ERROR_HEADER not in dict(r.headers) for r in replayed)  # the dead-letter headers are dropped
    assert sorted(r.value for r in replayed if r.value in garbage) == sorted(garbage)

    # The consumers count the fixed envelope once; what is still bad dead-letters again.
    new_ends = {p: max(r.offset + 1 for r in main if r.partition == p) for p in {r.partition for r in main}}
    async with running(consumer_settings(settings)) as (_, task):
        await wait_for_offsets(settings, new_ends, [task])
    assert await stored_offsets(settings) == new_ends
    await assert_tables_match(settings, [orjson.loads(e) for e in [*good, *fixed]])
    dlq = await read_records(settings, settings.dlq_topic, 9)
    assert len(dlq) == 9
    again = [dict(r.headers) for r in dlq if b"tally-replay-of" in b"".join(k.encode() for k, _ in r.headers)]
    assert len(again) == 4 and all(h["tally-replay-of"].startswith(settings.dlq_topic.encode()) for h in again)

    # A second run submits nothing: the letters that came back from the replay are skipped.
    code, out, err = await tally(settings, "dlq", "replay")
    assert code == 0, err
    assert out.startswith("replayed 0 dead letter(s)"), out
    assert "4 came back from an earlier replay" in out
    assert len(await read_records(settings, settings.topic, len(main))) == len(main)
    code, out, err = await tally(settings, "dlq", "replay")
    assert code == 0 and out.startswith("replayed 0 dead letter(s)") and "skipped" not in out, out

    # After a further fix, the ones that came back are sent once more, on request, and only once.
    code, out, err = await tally(settings, "dlq", "replay", "--include-replayed")
    assert code == 0 and out.startswith("replayed 4 dead letter(s)"), out + err
    came_back = sorted(f"{settings.dlq_topic}/{r.partition}/{r.offset}".encode() for r in dlq
                       if "tally-replay-of" in dict(r.headers))
    code, out, err = await tally(settings, "dlq", "replay", "--include-replayed")
    assert code == 0 and out.startswith("replayed 0 dead letter(s)"), out + err
    now_main = await read_records(settings, settings.topic, len(main) + 4)
    before = {(r.partition, r.offset) for r in main}
    sent_again = sorted(dict(r.headers)["tally-replay-of"] for r in now_main if (r.partition, r.offset) not in before)
    assert len(now_main) == len(main) + 4 and sent_again == came_back


async def test_replay_since_passes_older_letters_over_and_inspect_without_a_dlq_topic_says_so(
    migrated: Settings,
) -> None:
    old_ms = now_ms() - 7_200_000
    producer = AIOKafkaProducer(bootstrap_servers=migrated.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for i, ts in enumerate((old_ms, old_ms + 1, now_ms())):
            await producer.send_and_wait(migrated.dlq_topic, b"garbage %d" % i, partition=0, timestamp_ms=ts,
                                         headers=[(ERROR_HEADER, b"record is not JSON")])
    finally:
        await producer.stop()
    code, out, err = await tally(migrated, "dlq", "replay", "--since", "-1h", "--dry-run")
    assert code == 0, err
    assert out.splitlines()[-1].startswith("would replay 1 dead letter(s)") and "garbage 2" in out
    code, out, err = await tally(migrated, "dlq", "replay", "--since", "-1h")
    assert code == 0 and out.startswith("replayed 1 dead letter(s)"), out + err
    assert (await replay_positions(migrated))[0] == 3
    code, out, err = await tally(migrated, "dlq", "replay")  # the older two were passed over for good
    assert code == 0 and out.startswith("replayed 0 dead letter(s)"), out + err

    missing = migrated.model_copy(update={"dlq_topic": f"no.such.topic.{uuid.uuid4().hex[:8]}"})
    code, out, err = await tally(missing, "dlq", "inspect")
    assert code == 1 and "does not exist" in err
