"""The dead-letter producer: bad records and events go to the DLQ topic before their offsets commit.

Sends are awaited (acks=all) before the Postgres transaction that moves the
offsets past them, so a dead letter is never lost. A crash between the two sends
it again on the retry: the DLQ is at-least-once, the rollups exactly-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError

from consumers.decode import DeadLetter
from consumers.retry import kafka_transient, retrying
from core import kafka, logs, metrics
from core.kafka import MAX_RECORD_BYTES
from core.settings import Settings
from schemas.envelope import ERROR_HEADER, REQUEST_ID_HEADER

log = logging.getLogger(__name__)
TRUNCATED_HEADER = "tally-truncated-from"
_TRUNCATED_BYTES = MAX_RECORD_BYTES - 64 * 1024  # room for key and headers


def make_producer(settings: Settings) -> AIOKafkaProducer:
    return kafka.producer(settings, client_id="tally-consumer-dlq")


class DeadLetterSink:
    """Sends dead letters to `settings.dlq_topic` and waits for the broker's acks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.dlq_topic
        self.producer: AIOKafkaProducer | None = None

    async def start(self, *, stop: asyncio.Event | None = None) -> None:
        async def attempt() -> None:
            producer = make_producer(self.settings)
            try:
                await asyncio.wait_for(producer.start(), self.settings.produce_timeout_seconds)
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
            self.producer = producer

        await retrying(attempt, what="start DLQ producer", transient=kafka_transient, stop=stop)

    async def stop(self) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            await producer.stop()

    async def send(self, letters: Sequence[DeadLetter], *, stop: asyncio.Event | None = None) -> None:
        """Deliver every letter (retrying only those not yet acknowledged), then count them."""
        if not letters:
            return
        pending = list(letters)

        async def attempt() -> None:
            nonlocal pending
            async with asyncio.timeout(self.settings.produce_timeout_seconds * 2):
                futures = [await self._send_one(letter) for letter in pending]
                results = await asyncio.gather(*futures, return_exceptions=True)
            failed = [(letter, r) for letter, r in zip(pending, results, strict=True) if isinstance(r, BaseException)]
            pending = [letter for letter, _ in failed]
            if failed:
                raise failed[0][1]

        await retrying(attempt, what="send dead letters", transient=kafka_transient, stop=stop)
        for letter in letters:
            metrics.dlq_records.labels(letter.reason).inc()
        for (request, reason, error), count in Counter(map(_described, letters)).items():
            with logs.bound(request):  # the id ingest gave the batch: one grep follows it here
                log.warning("dead-lettered %d record(s): %s", count, error, extra={"reason": reason, "records": count})

    async def _send_one(self, letter: DeadLetter) -> asyncio.Future[object]:
        if self.producer is None:
            raise RuntimeError("DeadLetterSink.start() first")
        try:
            return await self.producer.send(self.topic, letter.value, key=letter.key, headers=list(letter.headers))  # type: ignore[no-any-return]
        except MessageSizeTooLargeError:
            # A record the producer cannot send as is would block its partition forever: keep its head.
            size = len(letter.value or b"")
            log.warning("dead letter of %d bytes truncated to %d", size, _TRUNCATED_BYTES)
            value = (letter.value or b"")[:_TRUNCATED_BYTES]
            headers = [*letter.headers, (TRUNCATED_HEADER, str(size).encode())]
            return await self.producer.send(self.topic, value, key=letter.key, headers=headers)  # type: ignore[no-any-return]


def _described(letter: DeadLetter) -> tuple[str | None, str, str]:
    """(request id, reason, error) of a dead letter, from the headers ingest and the consumer set."""
    found = dict(letter.headers)
    request = found.get(REQUEST_ID_HEADER)
    error = found.get(ERROR_HEADER, b"").decode("utf-8", "replace")[:200]
    return (request.decode("latin-1") if request else None), letter.reason, error
