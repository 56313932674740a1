"""Writing envelopes to Kafka with a bound on bytes in flight and a circuit breaker.

A request either gets every one of its records acknowledged by the broker
(acks=all) or an `Unavailable` error within a deadline; it never waits in an
unbounded queue. Refusing when the in-flight bound is reached keeps memory flat
however hard producers push. After a failed write the breaker opens: requests are
refused at once for `breaker_seconds`, then one request probes the broker while
the others are still refused, so a dead broker costs one deadline, not one per
request. The producer itself is started (and restarted) in the background, so
ingest comes up and answers 503 while Kafka is still down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from core import metrics
from core.problems import Unavailable

log = logging.getLogger(__name__)


class KafkaWriter:
    def __init__(
        self,
        make_producer: Callable[[], AIOKafkaProducer],
        topic: str,
        *,
        max_inflight_bytes: int,
        timeout: float,
        retry_after: int,
        breaker_seconds: float,
    ) -> None:
        self._make_producer = make_producer
        self._topic = topic
        self._max_inflight = max_inflight_bytes
        self._timeout = timeout
        self._retry_after = retry_after
        self._breaker_seconds = breaker_seconds
        self._inflight = 0
        self._producer: AIOKafkaProducer | None = None
        self._starter: asyncio.Task[None] | None = None
        self._open_until = 0.0
        self._probing = False
        self._last_error = "not connected yet"

    # Lifecycle.

    def start(self) -> None:
        # Built here, not in the task: a producer that cannot be made (a codec whose library is
        # missing) fails the start-up with its reason instead of a task that dies unseen while
        # ingest answers "not connected yet" for ever.
        first = self._make_producer()
        self._starter = asyncio.create_task(self._start_producer(first), name="kafka-producer-start")

    async def _start_producer(self, producer: AIOKafkaProducer) -> None:
        delay = 0.2
        while True:
            try:
                await producer.start()
            except KafkaError as exc:
                self._last_error = f"{type(exc).__name__}"
                log.warning("Kafka not reachable (%s); retrying in %.1f s", exc, delay)
                with contextlib.suppress(Exception):
                    await producer.stop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                producer = self._make_producer()
                continue
            self._producer = producer
            log.info("Kafka producer started")
            return

    async def stop(self) -> None:
        """Flush what is pending (bounded by the produce timeout) and close."""
        if self._starter is not None and not self._starter.done():
            self._starter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starter
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), self._timeout + 1)

    # State, for readiness and the tests.

    @property
    def producer(self) -> AIOKafkaProducer | None:
        return self._producer

    @property
    def inflight_bytes(self) -> int:
        return self._inflight

    @property
    def healthy(self) -> bool:
        return self._producer is not None and time.monotonic() >= self._open_until and not self._probing

    # Writing.

    def shed(self) -> None:
        """Refuse before the body is read when a write could not go through anyway:
        under overload the cheapest answer is the one given before any work."""
        if self._producer is None or time.monotonic() < self._open_until or self._probing:
            self._admit()
        if self._inflight >= self._max_inflight:
            metrics.backpressure_rejections.labels("inflight").inc()
            raise Unavailable(
                f"{self._inflight} bytes are in flight to Kafka (limit {self._max_inflight}); retry shortly",
                retry_after=self._retry_after,
            )

    async def write(self, values: list[bytes], headers: list[tuple[str, bytes]]) -> None:
        producer = self._admit()
        size = sum(len(v) for v in values)
        # One request larger than the whole bound may still go through alone.
        if self._inflight and self._inflight + size > self._max_inflight:
            self._end_probe(ok=None)
            metrics.backpressure_rejections.labels("inflight").inc()
            raise Unavailable(
                f"{self._inflight} bytes are in flight to Kafka (limit {self._max_inflight}); retry shortly",
                retry_after=self._retry_after,
            )
        self._inflight += size
        metrics.inflight_bytes.inc(size)
        start = time.perf_counter()
        acked = False
        try:
            await asyncio.wait_for(self._send_all(producer, values, headers), self._timeout)
            acked = True
        except TimeoutError:
            self._trip(f"no ack within {self._timeout:g} s")
            metrics.backpressure_rejections.labels("timeout").inc()
            raise Unavailable(
                f"Kafka did not acknowledge within {self._timeout:g} s", retry_after=self._retry_after
            ) from None
        except KafkaError as exc:
            self._trip(type(exc).__name__)
            metrics.backpressure_rejections.labels("kafka_error").inc()
            raise Unavailable(f"Kafka refused the write: {type(exc).__name__}", retry_after=self._retry_after) from None
        finally:
            self._inflight -= size
            metrics.inflight_bytes.dec(size)
            if not acked:
                self._end_probe(ok=None)  # however it ended, a probe must not stay in progress
        self._end_probe(ok=True)
        metrics.produce_latency.observe(time.perf_counter() - start)
        metrics.records_produced.inc(len(values))

    def _admit(self) -> AIOKafkaProducer:
        """The producer, or an immediate 503 while Kafka is known to be failing."""
        if self._producer is None:
            metrics.backpressure_rejections.labels("kafka_down").inc()
            raise Unavailable(f"Kafka is not reachable ({self._last_error})", retry_after=self._retry_after)
        if time.monotonic() < self._open_until or self._probing:
            metrics.backpressure_rejections.labels("kafka_down").inc()
            raise Unavailable(
                f"Kafka is failing ({self._last_error}); refusing until it answers again",
                retry_after=self._retry_after,
            )
        if self._open_until:  # the breaker was open and its pause is over: this request probes
            self._probing = True
        return self._producer

    def _trip(self, why: str) -> None:
        self._last_error = why
        self._probing = False
        self._open_until = time.monotonic() + self._breaker_seconds
        metrics.kafka_breaker_open.set(1)
        log.warning("Kafka write failed (%s); refusing writes for %.1f s", why, self._breaker_seconds)

    def _end_probe(self, *, ok: bool | None) -> None:
        if not self._probing:
            return
        self._probing = False
        if ok:
            self._open_until = 0.0
            metrics.kafka_breaker_open.set(0)
            log.info("Kafka answers again; accepting writes")

    async def _send_all(
        self, producer: AIOKafkaProducer, values: list[bytes], headers: list[tuple[str, bytes]]
    ) -> None:
        futures = [await producer.send(self._topic, value, headers=headers) for value in values]
        await asyncio.gather(*futures)
