"""Writing envelopes to Kafka with a bound on bytes in flight.

A request either gets every one of its records acknowledged by the broker
(acks=all) or an `Unavailable` error within a deadline; it never waits in an
unbounded queue. Refusing when the bound is reached keeps memory flat however
hard producers push.
"""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from core import metrics
from core.problems import Unavailable


class KafkaWriter:
    def __init__(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        *,
        max_inflight_bytes: int,
        timeout: float,
        retry_after: int,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._max_inflight = max_inflight_bytes
        self._timeout = timeout
        self._retry_after = retry_after
        self._inflight = 0

    @property
    def inflight_bytes(self) -> int:
        return self._inflight

    async def write(self, values: list[bytes], headers: list[tuple[str, bytes]]) -> None:
        size = sum(len(v) for v in values)
        # One request larger than the whole bound may still go through alone.
        if self._inflight and self._inflight + size > self._max_inflight:
            metrics.backpressure_rejections.labels("inflight").inc()
            raise Unavailable(
                f"{self._inflight} bytes are in flight to Kafka (limit {self._max_inflight}); retry shortly",
                retry_after=self._retry_after,
            )
        self._inflight += size
        metrics.inflight_bytes.inc(size)
        start = time.perf_counter()
        try:
            await asyncio.wait_for(self._send_all(values, headers), self._timeout)
        except TimeoutError:
            metrics.backpressure_rejections.labels("timeout").inc()
            raise Unavailable(
                f"Kafka did not acknowledge within {self._timeout:g} s", retry_after=self._retry_after
            ) from None
        except KafkaError as exc:
            metrics.backpressure_rejections.labels("kafka_error").inc()
            raise Unavailable(f"Kafka refused the write: {type(exc).__name__}", retry_after=self._retry_after) from None
        finally:
            self._inflight -= size
            metrics.inflight_bytes.dec(size)
        metrics.produce_latency.observe(time.perf_counter() - start)
        metrics.records_produced.inc(len(values))

    async def _send_all(self, values: list[bytes], headers: list[tuple[str, bytes]]) -> None:
        futures = [await self._producer.send(self._topic, value, headers=headers) for value in values]
        await asyncio.gather(*futures)
