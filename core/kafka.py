"""Kafka clients with Tally's defaults, which differ from aiokafka's on purpose.

aiokafka defaults to acks=1, auto-commit on and auto_offset_reset=latest; Tally
needs acks=all (a 2xx means durable), no auto-commit (offsets live in Postgres)
and earliest (a new group reads everything).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from core.settings import Settings

MAX_RECORD_BYTES = 2 * 1024 * 1024


def security(settings: Settings) -> dict[str, Any]:
    """TLS and SASL options shared by every client: producers, consumers and the admin client."""
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        cafile = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        options["ssl_context"] = create_ssl_context(cafile=cafile)
    if protocol.startswith("SASL"):
        options |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,
            "sasl_plain_password": settings.kafka_sasl_password,
        }
    return options


def producer(settings: Settings, *, client_id: str = "tally-ingest") -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **security(settings),
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
        compression_type=None if settings.kafka_compression == "none" else settings.kafka_compression,
        linger_ms=settings.producer_linger_ms,
        max_request_size=MAX_RECORD_BYTES,
        max_batch_size=MAX_RECORD_BYTES,
        request_timeout_ms=int(settings.produce_timeout_seconds * 1000),
        client_id=client_id,
    )


def consumer(settings: Settings, *, group_id: str | None, client_id: str = "tally-consumer") -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        **security(settings),
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_partition_fetch_bytes=MAX_RECORD_BYTES * 4,
        fetch_max_bytes=64 * 1024 * 1024,
        client_id=client_id,
    )


async def ensure_topics(settings: Settings, topics: Sequence[str] | None = None) -> None:
    """Create the event and DLQ topics with their partition count before anything produces.

    Creating them explicitly matters: an auto-created topic gets the broker's
    default partition count (Tansu: 4), which may be fewer than consumers.
    """
    names = topics or (settings.topic, settings.dlq_topic)
    admin = AIOKafkaAdminClient(
        **security(settings), bootstrap_servers=settings.kafka_bootstrap, client_id="tally-admin"
    )
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(t, settings.topic_partitions, settings.topic_replication) for t in names if t not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent migrate won
                await admin.create_topics(missing)
    finally:
        await admin.close()
