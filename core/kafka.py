"""Kafka clients with Tally's defaults, which differ from aiokafka's on purpose.

aiokafka defaults to acks=1, auto-commit on and auto_offset_reset=latest; Tally
needs acks=all (a 2xx means durable), no auto-commit (offsets live in Postgres)
and earliest (a new group reads everything).

Operator tools bound every step: `within` gives a step (connect, metadata, offsets) a
deadline, and `stop` gives up on a client that does not stop (aiokafka 0.14's consumer
can hang in `stop()` for ever: its fetcher swallows its own cancellation, aiokafka
issue 983). Neither waits for a task that ignores its cancellation, as `wait_for` would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeAlias, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from core.settings import Settings

log = logging.getLogger(__name__)
MAX_RECORD_BYTES = 2 * 1024 * 1024
STEP_SECONDS = 15.0  # an operator tool's Kafka step that takes longer is abandoned
STOP_SECONDS = 5.0
T = TypeVar("T")
Client: TypeAlias = AIOKafkaConsumer | AIOKafkaProducer | AIOKafkaAdminClient
C = TypeVar("C", AIOKafkaConsumer, AIOKafkaProducer, AIOKafkaAdminClient)


class Unanswered(TimeoutError):
    """Kafka did not answer a step within its deadline."""


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
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        client_id=client_id,
    )


async def within(settings: Settings, step: Awaitable[T], doing: str, seconds: float = STEP_SECONDS) -> T:
    """`await step`, for at most `seconds`: past that it is cancelled, not waited for, and
    Unanswered names the broker and what was being done."""
    task = asyncio.ensure_future(step)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise Unanswered(
            f"Kafka at {settings.kafka_bootstrap} did not answer within {seconds:g} s ({doing}): "
            "is it up, and is TALLY_KAFKA_BOOTSTRAP right?"
        )
    return task.result()


async def stop(client: Client, seconds: float = STOP_SECONDS) -> None:
    """Stop a client, giving up on it after `seconds`. Never raises: a stop runs in `finally`,
    after whatever went wrong, and must neither hide that nor hold the process."""
    task = asyncio.ensure_future(client.close() if isinstance(client, AIOKafkaAdminClient) else client.stop())
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        log.info("abandoned a Kafka client that did not stop within %g s", seconds)
    elif not task.cancelled() and task.exception() is not None:
        log.info("a Kafka client failed to stop: %r", task.exception())


@contextlib.asynccontextmanager
async def started(settings: Settings, client: C) -> AsyncIterator[C]:
    """The client, started within the step deadline, and stopped (bounded) however the block ends."""
    try:
        await within(settings, client.start(), "connecting")
        yield client
    finally:
        await stop(client)


async def ensure_topics(settings: Settings, topics: Sequence[str] | None = None) -> None:
    """Create the event and DLQ topics with their partition count before anything produces.

    Creating them explicitly matters: an auto-created topic gets the broker's
    default partition count (Tansu: 4), which may be fewer than consumers.
    """
    names = topics or (settings.topic, settings.dlq_topic)
    admin = AIOKafkaAdminClient(
        **security(settings), bootstrap_servers=settings.kafka_bootstrap, client_id="tally-admin"
    )
    async with started(settings, admin) as client:
        existing = set(await within(settings, client.list_topics(), "listing topics"))
        missing = [
            NewTopic(t, settings.topic_partitions, settings.topic_replication) for t in names if t not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent migrate won
                await within(settings, client.create_topics(missing), "creating topics")
