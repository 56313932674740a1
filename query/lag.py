"""Consumer lag per partition, measured from outside the consumer group (Kafka + Postgres I/O).

Positions come from `tally_offsets` (where the consumers keep them), the log end
from the broker, so lag is known while every consumer is down. The end offset is
the fetch highwater, not `end_offsets()`: on Tansu `end_offsets()` returns the last
batch's base offset + 1. So the probe assigns every partition to a group-less
consumer, seeks each to its stored offset (or the log start), fetches once, and
reads `highwater()` (set even by an empty fetch); the first record fetched is the
oldest unapplied one, and its timestamp gives the lag in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from sqlalchemy import MetaData, extract, func, select

from core import health, metrics
from core.db import ReadEngine
from core.kafka import consumer
from core.problems import NotFound, Unavailable
from core.settings import Settings
from schemas.api import LagReport, PartitionLag
from schemas.tables import offsets_table

_OFFSETS = offsets_table(MetaData())


class LagProbe:
    """One group-less consumer, started lazily and reused; probes are serialized by a lock."""

    def __init__(self, settings: Settings, engine: ReadEngine, *, timeout: float = 3.0) -> None:
        self._settings = settings
        self._engine = engine
        self._timeout = timeout
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()
        self._starting = asyncio.Lock()

    async def _client(self) -> AIOKafkaConsumer:
        async with self._starting:
            if self._consumer is None:
                c = consumer(self._settings, group_id=None, client_id="tally-query-lag")
                try:
                    await asyncio.wait_for(c.start(), self._timeout)
                except (KafkaError, OSError, TimeoutError) as exc:
                    with contextlib.suppress(Exception):
                        await c.stop()
                    raise Unavailable("Kafka is unreachable", retry_after=1) from exc
                self._consumer = c
            return self._consumer

    async def start(self) -> None:
        """Connect early when Kafka is up; a Kafka outage at start-up must not stop queries."""
        with contextlib.suppress(Unavailable):
            await self._client()

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def kafka_ok(self) -> bool:
        try:
            c = await self._client()
        except Unavailable:
            return False
        return await health.kafka_ok(c._client)

    async def _stored_offsets(self) -> dict[int, tuple[int, float]]:
        """Stored offset and seconds since it last moved, per partition (idle measured by Postgres's clock)."""
        idle = extract("epoch", func.now() - _OFFSETS.c.updated_at)
        stmt = select(_OFFSETS.c.partition, _OFFSETS.c.next_offset, idle).where(
            _OFFSETS.c.group_id == self._settings.consumer_group, _OFFSETS.c.topic == self._settings.topic
        )
        try:
            async with self._engine.connect() as conn:
                return {int(p): (int(o), max(0.0, float(s))) for p, o, s in (await conn.execute(stmt)).all()}
        except OSError as exc:
            raise Unavailable("the database is unreachable", retry_after=1) from exc

    async def report(self) -> LagReport:
        async with self._lock:
            started = time.perf_counter()
            stored = await self._stored_offsets()
            c = await self._client()
            try:
                partitions = await self._measure(c, stored)
            except (KafkaError, OSError, TimeoutError) as exc:
                raise Unavailable("Kafka did not answer the lag probe in time", retry_after=1) from exc
            metrics.lag_probe_seconds.observe(time.perf_counter() - started)
        return LagReport(
            group=self._settings.consumer_group,
            topic=self._settings.topic,
            partitions=partitions,
            total_lag_records=sum(p.lag_records for p in partitions),
            max_lag_seconds=max((p.lag_seconds for p in partitions), default=0.0),
        )

    async def _measure(self, c: AIOKafkaConsumer, stored_rows: dict[int, tuple[int, float]]) -> list[PartitionLag]:
        stored = {p: offset for p, (offset, _) in stored_rows.items()}
        topic = self._settings.topic
        deadline = time.monotonic() + self._timeout
        cluster = await asyncio.wait_for(c._client.fetch_all_metadata(), self._timeout)
        ids = cluster.partitions_for_topic(topic)
        if not ids:
            raise NotFound(f"topic {topic!r} does not exist: run `tally migrate`")
        tps = [TopicPartition(topic, p) for p in sorted(ids)]
        c.assign(tps)  # a fresh assignment: highwater marks start unknown
        try:
            starts: dict[TopicPartition, int] = await asyncio.wait_for(c.beginning_offsets(tps), self._timeout)
            # Records below the log start are gone; the consumer resumes at the log start too.
            position = {tp: max(stored.get(tp.partition, starts[tp]), starts[tp]) for tp in tps}
            for tp in tps:
                c.seek(tp, position[tp])
            first: dict[TopicPartition, Any] = {}
            end: dict[TopicPartition, int] = {}
            pending = set(tps)
            while pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no fetch answer for partitions {sorted(tp.partition for tp in pending)}")
                batch = await c.getmany(*pending, timeout_ms=int(min(remaining, 0.5) * 1000))
                for tp, records in batch.items():
                    if records:
                        first.setdefault(tp, records[0])
                for tp in list(pending):
                    highwater = c.highwater(tp)
                    if highwater is not None and (tp in first or highwater <= position[tp]):
                        end[tp] = highwater
                        pending.discard(tp)
        finally:
            c.unsubscribe()  # stop background fetching between probes
        now_ms = time.time() * 1000
        out = []
        for tp in tps:
            lag = max(0, end[tp] - position[tp])
            seconds = 0.0
            if lag and tp in first and first[tp].timestamp >= 0:
                seconds = max(0.0, (now_ms - first[tp].timestamp) / 1000)
            out.append(
                PartitionLag(
                    partition=tp.partition,
                    end_offset=end[tp],
                    stored_offset=stored.get(tp.partition),
                    lag_records=lag,
                    lag_seconds=round(seconds, 3),
                    idle_seconds=round(stored_rows[tp.partition][1], 3) if tp.partition in stored_rows else None,
                )
            )
        return out
