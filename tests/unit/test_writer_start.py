"""A producer that cannot be made fails ingest's start-up with its reason (ingest.writer)."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer

from ingest.writer import KafkaWriter


async def test_a_producer_that_cannot_be_made_fails_the_start_not_a_hidden_task() -> None:
    writer = KafkaWriter(
        lambda: AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", compression_type="brotli"),
        "t", max_inflight_bytes=1, timeout=1.0, retry_after=1, breaker_seconds=1.0,
    )
    with pytest.raises(ValueError, match="Invalid compression type"):
        writer.start()
