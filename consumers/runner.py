"""The loop step: poll -> prepare -> dead letters -> flush, pipelined, and the rebalance listener.

Pipelined: while batch N's transaction runs in Postgres (a task), the loop polls and
prepares batch N+1 (decode and aggregate, in a thread), growing it with every poll until
N has committed; then N+1 is flushed at once. So Postgres and Python work at the same
time, and the batch size adapts by itself: a consumer that is behind applies everything
that arrived during the last transaction in one (bigger batches, more collapse, fewer
commits), one that is caught up applies each poll as soon as it arrives (freshness).
`TALLY_BATCH_MAX_RECORDS` and `TALLY_BATCH_MAX_EVENTS` bound a batch; a full one waits.

Invariant: nothing is counted that Postgres does not have. `expected` holds the stored
next offset of each assigned partition, as of the last committed batch; the batch in
flight and the one being prepared continue from where the one before them ends, and are
only ever applied in that order, each in its own transaction whose offset update is
conditional on the stored offset being its start (consumers.flush). If the batch in
flight is fenced, the one prepared after it is dropped and the positions re-read: it
was prepared on the assumption that its predecessor commits. A crash anywhere loses
only what was not committed, which the next owner reads again from the stored offsets.

A lock makes preparing and settling batches mutually exclusive with the rebalance
callbacks, and a callback first waits for the batch in flight (so a revoked partition
is never written after its revocation returns) and drops the one being prepared. The
poll itself stays outside the lock: aiokafka's getmany waits, past its timeout, for a
rebalance in progress to finish, and the rebalance waits for our revoke callback;
holding the lock across getmany deadlocks the whole group (aio-libs/aiokafka#335). What
a poll returned is checked against the positions under the lock: records of partitions
revoked meanwhile are dropped, and records below a re-loaded stored offset are skipped
(batch.prepare).
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
from consumers.batch import TP, PreparedBatch, prepare
from consumers.dedup_store import Dedup
from consumers.dlq import DeadLetterSink
from consumers.flush import Flusher
from consumers.offsets import load_offsets
from consumers.registry import NotRegistered, StaleRollups, registry_version
from consumers.retry import postgres_transient, retrying
from consumers.versions import VersionBumper
from core import metrics
from core.settings import Settings
from schemas.envelope import REQUEST_ID_HEADER

log = logging.getLogger(__name__)
BUSY_POLL_MS = 5  # poll wait while a batch is in flight or prepared: how late the next one can start


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
        versions: VersionBumper | None = None,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.engine = engine
        self.dlq = dlq
        self.plans = tuple(plans)
        dedup = Dedup(engine, settings.dedup_window_hours) if settings.dedup else None
        self.flusher = Flusher(engine, settings.consumer_group, self.plans, dedup=dedup)
        self.stop = stop
        self.versions = versions  # moves the query cache's rollup versions after each commit
        self.expected: dict[TP, int] = {}  # stored next offsets, as of the last committed batch
        self.pending: PreparedBatch | None = None  # being prepared from polls, not yet flushing
        self.flying: PreparedBatch | None = None  # the batch `inflight` is flushing
        self.inflight: asyncio.Task[bool] | None = None
        self.lock = asyncio.Lock()

    # Rebalance callbacks (called by aiokafka's coordinator task).

    async def assigned(self, partitions: Iterable[Any]) -> None:
        """Seek every assigned partition to its stored offset before anything is fetched from it."""
        metrics.consumer_rebalances.inc()
        tps = sorted(_tp(p) for p in partitions)
        async with self.lock:
            await self._settle()
            self._forget_prepared()
            for gone in set(self.expected) - set(tps):
                self._drop(gone)
            await self._resync(tps)
        log.info("assigned %s", ", ".join(f"{t}[{p}]@{self.expected.get((t, p))}" for t, p in tps) or "nothing")

    async def revoked(self, partitions: Iterable[Any]) -> None:
        """Forget revoked partitions once the batch in flight is settled; drop the one being prepared.

        The partitions kept are sought back to their stored offsets by the assignment that follows.
        """
        async with self.lock:
            await self._settle()
            self._forget_prepared()
            for tp in partitions:
                self._drop(_tp(tp))

    def _forget_prepared(self) -> None:
        """Drop the batch being prepared: nothing of it is committed, so it is read again."""
        self.pending = None
        metrics.consumer_prepared_events.set(0)

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
        """After a failed poll: settle the batch in flight, drop the one being prepared, seek to the stored offsets."""
        async with self.lock:
            await self._settle()
            self._forget_prepared()
            await self._resync(sorted(self.expected))

    # The step.

    def _positions(self) -> dict[TP, int]:
        """Where the next poll's records continue: after the batch being prepared, or in flight, or committed."""
        positions = dict(self.expected)
        for batch in (self.flying, self.pending):
            if batch is not None:
                positions.update((tp, end) for tp, end in batch.ends().items() if tp in positions)
        return positions

    def _full(self) -> bool:
        pending, settings = self.pending, self.settings
        return pending is not None and (
            pending.records >= settings.batch_max_records or pending.events >= settings.batch_max_events
        )

    async def step(self) -> None:
        """Poll once, add what came back to the batch being prepared, and flush it when Postgres is free."""
        if self._full():  # nothing more fits: wait for the batch in flight instead of polling
            async with self.lock:
                await self._settle()
                await self._launch()
            return
        busy = self.inflight is not None or self.pending is not None
        room = self.settings.batch_max_records - (self.pending.records if self.pending is not None else 0)
        polled = await self._poll(BUSY_POLL_MS if busy else self.settings.batch_max_wait_ms, max(1, room))
        if polled is None:
            return
        async with self.lock:
            if polled:
                await self._prepare({_tp(tp): records for tp, records in polled.items()})
            if self.inflight is not None and self.inflight.done():
                await self._settle()
            await self._launch()
            self._observe_lag()

    async def _poll(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]] | None:
        """getmany, not under the lock (see the module docstring); None if a stop came first.

        getmany waits past its timeout while the group rebalances, and a rebalance can last (a
        member frozen or killed holds it up until its session expires): a stop must not wait
        for it. What a cancelled poll fetched stays unapplied, so it is read again by the
        partition's next owner.
        """
        poll = asyncio.ensure_future(self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records))
        stopping = asyncio.ensure_future(self.stop.wait())
        try:
            await asyncio.wait({poll, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this step cancelled: so is its poll
            poll.cancel()
            raise
        finally:
            stopping.cancel()
        if poll.done():
            return poll.result()  # type: ignore[no-any-return]
        poll.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poll
        return None

    async def _prepare(self, polled: dict[TP, list[Any]]) -> None:
        # Decoding and aggregating is CPU work: a thread keeps heartbeats, /metrics and the flush in flight going.
        batch = await asyncio.to_thread(
            prepare,
            polled,
            self._positions(),
            self.plans,
            dedup=self.flusher.dedup is not None,
            into=self.pending,
        )
        if batch.unknown:
            log.info("records for partitions whose offset is not loaded yet: %s; seeking", batch.unknown)
            unknown, batch.unknown = batch.unknown, []
            await self._resync(unknown)
        for (topic, partition), (start, first) in batch.gaps.items():
            log.warning(
                "%s[%d]: offsets %d..%d are gone from the log (retention?); skipped", topic, partition, start, first - 1
            )
        batch.gaps = {}
        if log.isEnabledFor(logging.DEBUG):  # the ids cost a pass over the records: only when asked
            batch.request_ids.update(dict.fromkeys(request_ids(polled)))
        self.pending = batch if batch.advances else None
        metrics.consumer_prepared_events.set(batch.events if self.pending is not None else 0)

    async def _launch(self) -> None:
        """Start flushing the prepared batch if none is in flight (its dead letters first, durably)."""
        if self.inflight is not None or self.pending is None:
            return
        batch, self.pending = self.pending, None
        metrics.consumer_prepared_events.set(0)
        for tp, timestamp in batch.first_timestamp_ms.items():
            lag.batch_started(tp, timestamp)
        await self.dlq.send(batch.dead, stop=self.stop)
        self.flying = batch
        self.inflight = asyncio.create_task(self.flusher.flush(batch, stop=self.stop), name="tally-flush")

    async def _settle(self) -> None:
        """Wait for the batch in flight; record it if it committed, re-read the positions if it was fenced."""
        task, batch = self.inflight, self.flying
        if task is None or batch is None:
            return
        try:
            committed = await task
        finally:
            self.inflight = self.flying = None
        if not committed:
            # Fenced by a moved offset, or by a migrate that changed the applied rollups.
            self._forget_prepared()  # prepared on the assumption that its predecessor commits
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
        if self.versions is not None:
            self.versions.committed(batch.changed)
        metrics.consumer_events_applied.inc(batch.events - batch.duplicates)
        metrics.consumer_batch_records.observe(batch.events)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "applied %d events",
                batch.events - batch.duplicates,
                extra={
                    "offsets": {f"{a.topic}[{a.partition}]": [a.expected, a.new] for a in batch.advances},
                    "request_ids": list(batch.request_ids),
                },
            )

    async def drain(self) -> None:
        """On stop: commit the batch in flight and the one prepared, so the next owner starts after them."""
        async with self.lock:
            await self._settle()
            await self._launch()
            await self._settle()

    async def close(self) -> None:
        """Stop background work (a flush still in flight, dedup partition expiry); `run` stops the consumer."""
        task, self.inflight, self.flying = self.inflight, None, None
        if task is not None and not task.done():
            task.cancel()  # not committed, so redone by the next owner
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
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
