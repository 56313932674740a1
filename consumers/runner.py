"""The loop step: poll -> prepare -> dead letters -> flush, and the rebalance listener around it.

Invariant: between steps, nothing is held in memory that Postgres does not have.
Every poll is applied (or refused) before the next, so a revoked partition needs
no flush, and `expected` (the stored next offset of each assigned partition) is
all the state there is. A lock makes applying a poll and a rebalance callback
mutually exclusive, so the positions cannot change under a batch being applied.
The poll itself stays outside the lock: aiokafka's getmany waits, past its
timeout, for a rebalance in progress to finish, and the rebalance waits for our
revoke callback; holding the lock across getmany deadlocks the whole group
(aio-libs/aiokafka#335). What a poll returned is checked against the positions
under the lock: records of partitions revoked meanwhile are dropped, and records
below a re-loaded stored offset are skipped (batch.prepare).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers import lag
from consumers.aggregate import RollupPlan
from consumers.batch import TP, prepare
from consumers.dedup_store import Dedup
from consumers.dlq import DeadLetterSink
from consumers.flush import Flusher
from consumers.offsets import load_offsets
from consumers.registry import NotRegistered, StaleRollups, registry_version
from consumers.retry import postgres_transient, retrying
from core import metrics
from core.settings import Settings
from schemas.envelope import REQUEST_ID_HEADER

log = logging.getLogger(__name__)


def _tp(tp: Any) -> TP:
    return (str(tp[0]), int(tp[1]))


class Runner:
    """One consumer's state (stored offsets of its partitions) and its poll/apply step."""

    def __init__(
        self,
        settings: Settings,
        consumer: AIOKafkaConsumer,
        engine: AsyncEngine,
        dlq: DeadLetterSink,
        plans: Sequence[RollupPlan],
        stop: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.engine = engine
        self.dlq = dlq
        self.plans = tuple(plans)
        dedup = Dedup(engine, settings.dedup_window_hours) if settings.dedup else None
        self.flusher = Flusher(engine, settings.consumer_group, self.plans, dedup=dedup)
        self.stop = stop
        self.expected: dict[TP, int] = {}
        self.lock = asyncio.Lock()

    # Rebalance callbacks (called by aiokafka's coordinator task).

    async def assigned(self, partitions: Iterable[Any]) -> None:
        """Seek every assigned partition to its stored offset before anything is fetched from it."""
        metrics.consumer_rebalances.inc()
        tps = sorted(_tp(p) for p in partitions)
        async with self.lock:
            for gone in set(self.expected) - set(tps):
                self._drop(gone)
            await self._resync(tps)
        log.info("assigned %s", ", ".join(f"{t}[{p}]@{self.expected.get((t, p))}" for t, p in tps) or "nothing")

    async def revoked(self, partitions: Iterable[Any]) -> None:
        """Forget revoked partitions: waits for a batch in flight, so there is nothing to flush."""
        async with self.lock:
            for tp in partitions:
                self._drop(_tp(tp))

    def _drop(self, tp: TP) -> None:
        self.expected.pop(tp, None)
        lag.forget(tp)

    async def _resync(self, tps: Sequence[TP]) -> None:
        """Re-read stored offsets and seek to them: after an assignment, a fenced batch or an error."""
        if not tps:
            return
        stored = await load_offsets(self.engine, self.settings.consumer_group, tps, stop=self.stop)
        assigned = {_tp(p) for p in self.consumer.assignment()}
        for tp, offset in sorted(stored.items()):
            if tp not in assigned:  # moved away meanwhile; its new owner seeks it
                self._drop(tp)
                continue
            self.expected[tp] = offset
            with contextlib.suppress(IllegalStateError):
                self.consumer.seek(TopicPartition(*tp), offset)

    async def resync_all(self) -> None:
        async with self.lock:
            await self._resync(sorted(self.expected))

    # The step.

    async def step(self) -> None:
        """Poll once and apply what came back, all in one Postgres transaction."""
        polled = await self.consumer.getmany(  # not under the lock: see the module docstring
            timeout_ms=self.settings.batch_max_wait_ms, max_records=self.settings.batch_max_records
        )
        async with self.lock:
            if polled:
                await self._apply({_tp(tp): records for tp, records in polled.items()})
            self._observe_lag()

    async def _apply(self, polled: dict[TP, list[Any]]) -> None:
        # Decoding and aggregating is CPU work: a thread keeps heartbeats and /metrics answering.
        batch = await asyncio.to_thread(
            prepare, polled, dict(self.expected), self.plans, dedup=self.flusher.dedup is not None
        )
        if batch.unknown:
            log.info("records for partitions whose offset is not loaded yet: %s; seeking", batch.unknown)
            await self._resync(batch.unknown)
        for (topic, partition), (start, first) in batch.gaps.items():
            log.warning(
                "%s[%d]: offsets %d..%d are gone from the log (retention?); skipped", topic, partition, start, first - 1
            )
        if not batch.advances:
            return
        for tp, timestamp in batch.first_timestamp_ms.items():
            lag.batch_started(tp, timestamp)
        await self.dlq.send(batch.dead, stop=self.stop)
        if not await self.flusher.flush(batch, stop=self.stop):
            # Fenced by a moved offset, or by a migrate that changed the applied rollups.
            try:
                self.flusher.version = await retrying(
                    lambda: registry_version(self.engine, [p.spec for p in self.plans]),
                    what="read the rollup registry",
                    transient=postgres_transient,
                    stop=self.stop,
                )
            except NotRegistered as exc:  # a migrate retired one of our rollups: our file is stale
                raise StaleRollups(str(exc)) from None
            await self._resync(sorted(self.expected))
            return
        for adv in batch.advances:
            self.expected[(adv.topic, adv.partition)] = adv.new
        metrics.consumer_events_applied.inc(batch.events - batch.duplicates)
        metrics.consumer_batch_records.observe(batch.events)
        if log.isEnabledFor(logging.DEBUG):  # the ids cost a pass over the records: only when asked
            log.debug(
                "applied %d events",
                batch.events - batch.duplicates,
                extra={
                    "offsets": {f"{a.topic}[{a.partition}]": [a.expected, a.new] for a in batch.advances},
                    "request_ids": request_ids(polled),
                },
            )

    async def close(self) -> None:
        """Stop background work (dedup partition expiry); the consumer itself is stopped by `run`."""
        if self.flusher.dedup is not None:
            await self.flusher.dedup.close()

    def _observe_lag(self) -> None:
        assigned = {_tp(p) for p in self.consumer.assignment()}
        for tp, next_offset in self.expected.items():
            if tp in assigned:
                lag.observe(tp, self.consumer.highwater(TopicPartition(*tp)), next_offset)


class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka's rebalance hooks, forwarded to the runner."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def on_partitions_revoked(self, revoked: Iterable[Any]) -> None:
        await self.runner.revoked(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[Any]) -> None:
        await self.runner.assigned(assigned)


def request_ids(polled: dict[TP, list[Any]]) -> list[str]:
    """The distinct ingest request ids (`tally-request-id` headers) of the polled records, in order."""
    found: dict[str, None] = {}
    for records in polled.values():
        for record in records:
            for key, value in record.headers or ():
                if key == REQUEST_ID_HEADER and value:
                    found[value.decode("latin-1")] = None
    return list(found)
