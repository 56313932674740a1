"""Large CSV exports, streamed from a server-side cursor instead of cached (Postgres I/O).

A page (`limit` up to TALLY_MAX_LIMIT) goes through the cache as bytes. An export
asks for more rows than a page (up to TALLY_MAX_EXPORT_ROWS): its rows are fetched
in chunks and written as they arrive, so memory stays at one chunk whatever the
size, and a slow reader slows the fetch instead of filling a buffer. Each export
holds a database connection for its whole transfer, so at most
TALLY_MAX_EXPORTS run at once per process; beyond that, a fast 503 with Retry-After.
A transfer may take as long as its reader does, but each step on the database (the
total, the query, each chunk) gets the query deadline: a frozen Postgres ends the
export (a 503 before the first row, a cut-off body after it) and frees its slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

from core import metrics
from core.db import ReadEngine
from core.problems import Unavailable
from query.catalog import Rollup, Source
from query.cursor import Value
from query.derived import finish, plain
from query.params import RollupQuery
from query.planner import count_plan, plan
from query.render import csv_header, csv_rows
from query.service import bounded_connection, connect_within, cut_after, database_errors
from schemas.rollups import RollupSpec

CHUNK_ROWS = 2_000


class ExportGate:
    """Counts running exports; refuses, never queues, past the bound."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.running = 0

    def enter(self) -> None:
        if self.running >= self._limit:
            raise Unavailable(
                f"{self.running} exports are already running, the most this replica serves at once "
                "(TALLY_MAX_EXPORTS); retry shortly or page with a smaller limit",
                retry_after=5,
            )
        self.running += 1

    def leave(self) -> None:
        self.running -= 1


@dataclass(frozen=True, slots=True)
class Export:
    body: AsyncIterator[bytes]
    total: int | None  # `total=true`: counted before the first row is sent, for X-Total-Count


async def open_export(
    engine: ReadEngine,
    gate: ExportGate,
    rollup: Rollup,
    q: RollupQuery,
    after: Sequence[Value] | None,
    *,
    deadline: float,
) -> Export:
    """The export, already started: the query has run (or failed as a 503) and the first
    chunk is ready before the response is committed to a 200. Each step on the database
    must be done within `deadline` seconds."""
    total = None
    source = rollup.source(q)
    if q.in_python:
        return await _ranked_in_python(engine, gate, rollup, q, after, deadline=deadline)
    if q.total:
        async with database_errors(engine), bounded_connection(engine, deadline) as conn:
            counted = count_plan(rollup.spec, source.table, q, stored=source.granularity)
            total = int((await conn.execute(counted)).one()[0])
    chunks = _chunks(engine, gate, rollup.spec, source, q, after, deadline)
    first = await anext(chunks)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:  # a client that went away: give the connection and the slot back now, not at GC
            await chunks.aclose()

    return Export(body(), total)


async def _ranked_in_python(
    engine: ReadEngine,
    gate: ExportGate,
    rollup: Rollup,
    q: RollupQuery,
    after: Sequence[Value] | None,
    *,
    deadline: float,
) -> Export:
    """An export ordered or filtered by a sketch field: every group is needed to rank them, so the
    rows are fetched and paged (query.derived) before the response starts, and sent in chunks."""
    source = rollup.source(q)
    gate.enter()
    try:
        metrics.query_computations.labels(q.rollup, "export").inc()
        async with database_errors(engine), bounded_connection(engine, deadline) as conn:
            stmt = plan(rollup.spec, source.table, q, after, stored=source.granularity)
            page = await asyncio.to_thread(finish, rollup.spec, q, (await conn.execute(stmt)).all(), after)
    finally:
        gate.leave()
    rows = [r[:-1] for r in page.rows]
    metrics.query_rows.labels(q.rollup).inc(len(rows))

    async def body() -> AsyncIterator[bytes]:
        yield csv_header(q) + csv_rows(q, rows[:CHUNK_ROWS])
        for start in range(CHUNK_ROWS, len(rows), CHUNK_ROWS):
            yield csv_rows(q, rows[start : start + CHUNK_ROWS])

    return Export(body(), page.matched if q.total else None)


async def _chunks(
    engine: ReadEngine,
    gate: ExportGate,
    spec: RollupSpec,
    source: Source,
    q: RollupQuery,
    after: Sequence[Value] | None,
    deadline: float,
) -> AsyncGenerator[bytes, None]:
    gate.enter()
    try:
        metrics.query_computations.labels(q.rollup, "export").inc()
        async with database_errors(engine):
            conn, driver = await connect_within(engine, deadline)
            try:
                with cut_after(driver, deadline):
                    result = await conn.stream(plan(spec, source.table, q, after, stored=source.granularity))
                head = csv_header(q)
                while True:
                    with cut_after(driver, deadline):  # each chunk, not the whole transfer
                        fetched = await result.fetchmany(CHUNK_ROWS)
                    chunk = (
                        finish(spec, q, fetched).rows
                        if plain(spec, q)
                        else (await asyncio.to_thread(finish, spec, q, fetched)).rows
                    )
                    if not chunk:
                        break
                    rows = [r[:-1] for r in chunk]  # each row ends with its stored-row count
                    metrics.query_rows.labels(q.rollup).inc(len(rows))
                    yield head + csv_rows(q, rows)
                    head = b""
                if head:
                    yield head  # no rows: the header alone
            finally:
                await conn.close()  # back to the pool, or dropped once cut
    finally:
        gate.leave()
