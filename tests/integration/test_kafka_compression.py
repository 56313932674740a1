"""Every codec TALLY_KAFKA_COMPRESSION offers works end to end, on the real embedded broker.

For each of none, gzip, lz4, zstd and snappy:
- ingest's own producer (the real ingest app, `core.kafka.producer` with the setting) writes
  the envelopes of known events; a `tally consume` process applies them; the rollup tables equal
  the aggregates of the events exactly;
- a `tally consume` process whose own TALLY_KAFKA_COMPRESSION is `none` reads a topic that
  another producer (a bare aiokafka producer) compressed with the codec, and counts it exactly.

Each test also reads the topic's raw record batches and checks that every one carries the
codec: a setting that was ignored on the way to the producer would not pass for lz4 and still
use no compression. lz4, zstd and snappy need `cramjam` (aiokafka's extras): without it the
producer's constructor raises "Compression library for ... not found" and these cases fail.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.default_records import DefaultRecordBase
from aiokafka.record.memory_records import MemoryRecords

from core.kafka import ensure_topics
from core.settings import Settings
from ingest.app import create_app
from schemas.envelope import headers as envelope_headers
from tests.conftest import serve
from tests.fault.support import start_consumer, wait_caught_up
from tests.integration.consumer_helpers import assert_tables_match, envelopes, make_events, stored_offsets

pytestmark = pytest.mark.integration

CODECS = ("none", "gzip", "lz4", "zstd", "snappy")
CODEC_IDS = {
    "none": DefaultRecordBase.CODEC_NONE,
    "gzip": DefaultRecordBase.CODEC_GZIP,
    "lz4": DefaultRecordBase.CODEC_LZ4,
    "zstd": DefaultRecordBase.CODEC_ZSTD,
    "snappy": DefaultRecordBase.CODEC_SNAPPY,
}


async def stored_batches(settings: Settings) -> tuple[dict[int, int], dict[int, int]]:
    """The topic as the broker keeps it: {codec id: number of record batches} over every partition,
    and every partition's end offset (the fetch response's high watermark: Tansu's ListOffsets
    answers the last batch's base offset + 1, EMBEDDED.md). Reads the batch headers only, so it
    needs no codec library."""
    client = AIOKafkaClient(bootstrap_servers=settings.kafka_bootstrap, client_id="tally-test-raw")
    await client.bootstrap()
    codecs: dict[int, int] = {}
    ends: dict[int, int] = {}
    try:
        await client.force_metadata_update()
        for partition in sorted(client.cluster.partitions_for_topic(settings.topic) or ()):
            leader = client.cluster.leader_for_partition(TopicPartition(settings.topic, partition))
            offset, highwater = 0, 1
            while offset < highwater:
                request = FetchRequest(500, 1, 8 << 20, 0, [(settings.topic, [(partition, offset, 8 << 20)])])
                response = await client.send(leader, request)
                [(_, [part])] = response.topics
                error, highwater, raw = part[1], part[2], part[-1]
                assert error == 0, f"fetch of partition {partition} at {offset}: error {error}"
                records = MemoryRecords(raw)
                moved = False
                while (batch := records.next_batch()) is not None:
                    codecs[batch.compression_type] = codecs.get(batch.compression_type, 0) + 1
                    offset = batch.base_offset + batch.last_offset_delta + 1
                    moved = True
                assert moved or offset >= highwater, f"no batch at offset {offset} of partition {partition}"
            ends[partition] = highwater
    finally:
        await client.close()
    return codecs, ends


async def consume_and_check(settings: Settings, tmp: Path, events: list[dict[str, Any]], codec: str) -> None:
    """The batches on the broker carry `codec`; a `tally consume` process applies them all, once."""
    codecs, ends = await stored_batches(settings)
    assert codecs.keys() == {CODEC_IDS[codec]}, f"batches by codec id: {codecs}, expected only {codec}"
    assert sum(ends.values()) > 0
    consumer = await start_consumer(settings, tmp)
    try:
        await wait_caught_up(settings, ends, [consumer], f"consumer of a {codec} topic")
    finally:
        assert consumer.stop() == 0, consumer.log()[-3000:]
    stored = await stored_offsets(settings)
    assert {p: stored.get(p, 0) for p in ends} == ends  # an empty partition may be stored at 0, or not at all
    assert stored.keys() <= ends.keys()
    await assert_tables_match(settings, events)


def known_events(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` events as a producer sends them (event_id and ts set, received_at left to ingest)."""
    out = []
    for encoded in make_events(n, random.Random(seed)):
        event = orjson.loads(encoded)
        del event["received_at"]
        out.append(event)
    return out


@pytest.mark.parametrize("codec", CODECS)
async def test_ingest_compressing_with_each_codec_is_counted_exactly(
    migrated: Settings, tmp_path: Path, codec: str
) -> None:
    settings = migrated.model_copy(update={"kafka_compression": codec})
    events = known_events(1_200, seed=CODECS.index(codec))
    bodies = [orjson.dumps({"events": events[i:i + 100]}) for i in range(0, len(events), 100)]  # the bench's size

    async with serve(create_app(settings)) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        for _ in range(200):  # the producer starts in the background; a codec it cannot load never starts
            if (await http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        for i in range(0, len(bodies), 4):  # 4 requests at once: records share batches in the producer
            answers = await asyncio.gather(*(http.post("/v1/events", content=body,
                                                       headers={"content-type": "application/json"})
                                             for body in bodies[i:i + 4]))
            for r in answers:
                assert (r.status_code, r.json()) == (202, {"accepted": 100, "rejected": []}), r.text

    await consume_and_check(settings, tmp_path, events, codec)


@pytest.mark.parametrize("codec", CODECS)
async def test_a_consumer_reads_a_topic_another_producer_compressed_with_each_codec(
    migrated: Settings, tmp_path: Path, codec: str
) -> None:
    settings = migrated.model_copy(update={"kafka_compression": "none"})  # not the consumer's own codec
    await ensure_topics(settings)
    encoded = make_events(900, random.Random(10 + CODECS.index(codec)))
    values = envelopes(encoded, 30)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=False,
                                compression_type=None if codec == "none" else codec, linger_ms=20,
                                client_id="another-producer")
    await producer.start()
    try:
        futures = [await producer.send(settings.topic, value, partition=i % settings.topic_partitions,
                                       headers=envelope_headers(uuid.uuid4().hex))
                   for i, value in enumerate(values)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()

    await consume_and_check(settings, tmp_path, [orjson.loads(e) for e in encoded], codec)
