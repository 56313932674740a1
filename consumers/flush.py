"""Step 4: apply one prepared batch in ONE Postgres transaction, or refuse it if fenced.

The transaction first moves each partition's stored offset from the batch's start
to its end, but only if the stored offset is still the batch's start. If any
partition's row did not match, another consumer has applied those records (we
are a zombie after a rebalance): everything rolls back and the caller re-reads
the stored offsets. Only then are the rollup rows upserted, so the counts and
the offsets always move together: the exactly-once effect of DESIGN §5.
With TALLY_DEDUP the batch's event ids are claimed in the same transaction, between
the two (consumers.dedup_store), so the claims move with them too.
Sketch measures are read, united and written back under the upsert's row locks, in the
same transaction (consumers.sql), so they move with the offsets like every other measure.
A rollup's coarse tables (`granularities`) are upserted in the same transaction,
from cells derived from the base cells (consumers.aggregate.table_cells) after any
claim, so every table of every rollup moves with the offsets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.aggregate import Aggregates, Cells, RollupPlan, table_cells
from consumers.batch import PreparedBatch
from consumers.dedup_store import Claimed, Dedup
from consumers.retry import postgres_transient, retrying
from consumers.sql import ADVANCE_OFFSET, COPY_MIN_ROWS, RECORD_STARTS, Upsert, upserts
from core import metrics

log = logging.getLogger(__name__)
_T = TypeVar("_T")


async def _now(function: Callable[[Cells], _T], cells: Cells) -> _T:
    """`function(cells)` on the event loop: `asyncio.to_thread`'s shape for work too small to hand off."""
    return function(cells)


class _Fenced(Exception):
    """Raised inside the transaction so that it rolls back."""


class Flusher:
    """Writes prepared batches for one consumer group."""

    def __init__(
        self,
        engine: AsyncEngine,
        group_id: str,
        plans: Sequence[RollupPlan],
        *,
        version: int = 0,
        record_starts: bool = True,
        dedup: Dedup | None = None,
    ) -> None:
        self.engine = engine
        self.group_id = group_id
        self.plans = tuple(plans)
        # Every stored table of every rollup, base then coarser, in one order for every consumer.
        self.upserts: tuple[Upsert, ...] = upserts(self.plans)
        self.version = version  # the rollup registry version this flusher applies for
        self.record_starts = record_starts
        self._started: set[tuple[str, int]] = set()  # partitions whose rollup starts are recorded
        self.dedup = dedup  # claims event ids in the same transaction (TALLY_DEDUP)

    def tables(self, aggregates: Aggregates) -> dict[str, Cells]:
        """The cells of every stored table: each rollup's base cells and the coarser cells derived from them."""
        out: dict[str, Cells] = {}
        for plan in self.plans:
            cells = aggregates.get(plan.name)
            if cells:
                out.update(table_cells(plan, cells))
        return out

    async def apply(self, batch: PreparedBatch) -> bool:
        """One attempt: True if committed, False if fenced (rolled back, nothing changed)."""
        opened = time.monotonic()
        # The coarse cells are derived before the transaction when no claim can change the base
        # cells, else after the claim (it takes duplicates out of them).
        tables = self.tables(batch.aggregates) if self.dedup is None or batch.candidates is None else None
        try:
            async with self.engine.begin() as conn:
                for adv in sorted(batch.advances, key=lambda a: (a.topic, a.partition)):
                    result = await conn.execute(
                        ADVANCE_OFFSET,
                        {
                            "group_id": self.group_id,
                            "topic": adv.topic,
                            "partition": adv.partition,
                            "expected": adv.expected,
                            "new": adv.new,
                            "version": self.version,
                        },
                    )
                    if result.rowcount != 1:
                        raise _Fenced
                aggregates = batch.aggregates
                claimed: Claimed | None = None
                if self.dedup is not None and batch.candidates is not None:
                    claimed = await self.dedup.claim(conn, batch.candidates, aggregates, self.plans, opened=opened)
                    aggregates, batch.duplicates = claimed.aggregates, claimed.duplicates
                if tables is None:
                    tables = self.tables(aggregates)
                batch.changed = tuple(name for name, cells in aggregates.items() if cells)
                for up in self.upserts:
                    cells = tables.get(up.table)
                    if not cells:
                        continue
                    # Sketches are encoded to bytes on the way: CPU, so off the event loop.
                    encode = asyncio.to_thread if up.sketch_at else _now
                    if len(cells) < COPY_MIN_ROWS:
                        result = await conn.execute(up.statement, await encode(up.params, cells))
                    else:
                        # Every time, in this transaction: after the first it is a catalog look-up, and a
                        # batch rolled back with the table's creation in it cannot leave the next without one.
                        await conn.execute(up.create_stage)
                        driver: Any = (await conn.get_raw_connection()).driver_connection
                        records = await encode(up.records, cells)
                        await driver.copy_records_to_table(up.stage, records=records, columns=up.columns)
                        result = await conn.execute(up.from_stage)
                    if up.set_sketches is not None:  # the rows are locked by the upsert: unite and write
                        stored = result.all()
                        unions = await asyncio.to_thread(up.merged_sketches, cells, stored)
                        if unions["s0"]:
                            await conn.execute(up.set_sketches, unions)
                starting = [a for a in batch.advances if (a.topic, a.partition) not in self._started]
                for adv in starting if self.record_starts else ():
                    await conn.execute(
                        RECORD_STARTS,
                        {
                            "group_id": self.group_id,
                            "topic": adv.topic,
                            "partition": adv.partition,
                            "start": adv.expected,
                            "rollups": [p.name for p in self.plans],
                        },
                    )
                if claimed is not None:
                    claimed.check_commit()  # last, right before COMMIT
        except _Fenced:
            return False
        self._started.update((a.topic, a.partition) for a in starting)
        return True

    async def flush(self, batch: PreparedBatch, *, stop: asyncio.Event | None = None) -> bool:
        """Apply `batch`, retrying through restarts and deadlocks; False if fenced.

        A retry after a commit whose acknowledgement was lost is safe: the stored
        offsets have moved, so the retry is fenced and applies nothing.
        """
        started = time.perf_counter()
        if self.dedup is not None:
            await retrying(self.dedup.maintain, what="dedup partitions", transient=postgres_transient, stop=stop)
        applied = await retrying(lambda: self.apply(batch), what="flush", transient=postgres_transient, stop=stop)
        if not applied:
            metrics.consumer_fenced.inc()
            log.warning(
                "batch fenced: stored offsets moved for %s",
                ", ".join(f"{a.topic}[{a.partition}]@{a.expected}" for a in batch.advances),
            )
            return False
        metrics.consumer_batch_seconds.observe(time.perf_counter() - started)
        if batch.duplicates:
            metrics.consumer_duplicates.inc(batch.duplicates)
        for plan in self.plans:  # base rows: the coarse tables' rows are derived from them
            rows = len(batch.aggregates.get(plan.name, ()))
            if rows:
                metrics.consumer_rows_upserted.labels(plan.name).inc(rows)
        return True
