"""Reading a topic back in tests, to check exactly what reached Kafka."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas.envelope import unpack


async def read_topic(bootstrap: str, topic: str, *, expect_events: int, timeout_ms: int = 10_000) -> list[
    tuple[dict[str, Any], dict[str, bytes]]
]:
    """Every event in the topic with its record headers, reading until `expect_events` arrived
    and then one more empty poll (so extra events would be seen)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        await consumer._client.fetch_all_metadata()
        partitions = sorted(consumer.partitions_for_topic(topic) or [])
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[dict[str, Any], dict[str, bytes]]] = []
        empty_polls = 0
        waited = 0
        while empty_polls < 2 and waited < timeout_ms:
            batch = await consumer.getmany(timeout_ms=300)
            waited += 300
            records = [r for rs in batch.values() for r in rs]
            if not records and len(out) >= expect_events:
                empty_polls += 1
            for record in records:
                heads = dict(record.headers)
                out.extend((event, heads) for event in unpack(record.value))
        return out
    finally:
        await consumer.stop()
