"""Run one planned rollup query on the read engine and render it into a cacheable entry (Postgres I/O)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection

from core import metrics
from core.db import ReadEngine, exception_chain
from core.problems import TallyError, Unavailable
from query import cursor as cursors
from query.cache_policy import Entry, Ttl, etag_for
from query.catalog import Rollup
from query.cursor import Value
from query.derived import finish, plain
from query.params import RollupQuery
from query.planner import count_plan, plan
from query.render import render

_QUERY_CANCELED = "57014"  # statement_timeout
# The server is shutting down, crashed, starting up or out of connection slots; class 08 is
# "connection exception". asyncpg raises these untranslated while connecting (57P03 during a
# restart), and translated (`.orig.sqlstate`) on a pooled connection.
_UNREACHABLE = frozenset({"57P01", "57P02", "57P03", "53300"})


def unavailable(exc: BaseException) -> Unavailable | None:
    """The 503 for a database failure the client should retry, or None for a bug (a 500)."""
    chain = exception_chain(exc)
    states = {s for s in (getattr(e, "sqlstate", None) for e in chain) if isinstance(s, str)}
    if _QUERY_CANCELED in states:
        return Unavailable("the query ran past the statement timeout: narrow the range or filter", retry_after=5)
    if any(isinstance(e, PoolTimeout) for e in chain):
        return Unavailable("the database is unreachable or saturated", retry_after=1)
    if (
        states & _UNREACHABLE
        or any(s.startswith("08") for s in states)
        or any(isinstance(e, DBAPIError) and e.connection_invalidated for e in chain)
        or any(isinstance(e, OSError | TimeoutError) for e in chain)
    ):
        return Unavailable("the database is unreachable", retry_after=1)
    return None


@contextlib.asynccontextmanager
async def database_errors(engine: ReadEngine) -> AsyncIterator[None]:
    """Turn a timed-out query or an unreachable, restarting or saturated database into a 503 with
    Retry-After (never a 500, never a hang: connecting and checking out are bounded by core.db)."""
    try:
        yield
    except TallyError:
        raise  # already what the client should see (e.g. the lag probe's own 503)
    except Exception as exc:
        problem = unavailable(exc)
        if problem is None:
            raise
        raise problem from exc
    finally:
        metrics.db_pool_in_use.labels("query").set(engine.pool.checkedout())  # type: ignore[attr-defined]


def _too_late(seconds: float) -> Unavailable:
    return Unavailable(f"the database did not answer within {seconds:g} s", retry_after=1)


@contextlib.contextmanager
def cut_at(driver: Any, deadline: float, seconds: float) -> Iterator[None]:
    """Close the connection's socket at `deadline` (loop time) if the work in the block is still
    under way: the step in flight fails at once, the pool drops the connection, and the failure
    is a 503 that says how long the database was given.

    statement_timeout is enforced by the server, so a server that is frozen or cut off by a
    partition never enforces it, and a query on a pooled connection would wait for ever (the
    kernel keeps the idle TCP connection open). Cancelling the query instead would make
    SQLAlchemy say goodbye to the silent server first, for 2 s more.
    """
    loop = asyncio.get_running_loop()
    cut = loop.call_at(deadline, driver.terminate)  # asyncpg: closes the socket
    try:
        yield
    except Exception as exc:
        if loop.time() >= deadline:
            raise _too_late(seconds) from exc
        raise
    finally:
        cut.cancel()


def cut_after(driver: Any, seconds: float) -> contextlib.AbstractContextManager[None]:
    """`cut_at` `seconds` from now: for one step of a longer piece of work."""
    return cut_at(driver, asyncio.get_running_loop().time() + seconds, seconds)


async def connect_within(engine: ReadEngine, seconds: float) -> tuple[AsyncConnection, Any]:
    """A connection checked out (or connected) within `seconds`, or a 503; and its driver."""
    conn = engine.connect()
    try:
        async with asyncio.timeout(seconds):
            await conn.start()
    except TimeoutError as exc:
        raise _too_late(seconds) from exc
    return conn, (await conn.get_raw_connection()).driver_connection


@contextlib.asynccontextmanager
async def bounded_connection(engine: ReadEngine, seconds: float) -> AsyncIterator[AsyncConnection]:
    """A connection whose work, checkout included, must be over within `seconds`, or a 503 (`cut_at`)."""
    deadline = asyncio.get_running_loop().time() + seconds
    conn, driver = await connect_within(engine, seconds)
    with cut_at(driver, deadline, seconds):
        try:
            yield conn
        finally:
            await conn.close()  # back to the pool (a rollback), or dropped once cut


async def run_query(
    engine: ReadEngine,
    rollup: Rollup,
    q: RollupQuery,
    after: Sequence[Value] | None,
    *,
    secret: str,
    ttl: Ttl,
    reason: str,
    deadline: float,
) -> Entry:
    """Run the query (and the total, if asked) within `deadline` seconds, and render the entry."""
    started = time.perf_counter()
    metrics.query_computations.labels(q.rollup, reason).inc()
    total: int | None = None
    source = rollup.source(q)
    async with database_errors(engine), bounded_connection(engine, deadline) as conn:
        metrics.db_pool_in_use.labels("query").set(engine.pool.checkedout())  # type: ignore[attr-defined]
        stmt = plan(rollup.spec, source.table, q, after, stored=source.granularity)
        fetched_rows = (await conn.execute(stmt)).all()
        if plain(rollup.spec, q):
            page = finish(rollup.spec, q, fetched_rows, after)
        else:  # sketches to unite (and maybe groups to rank): CPU work, off the event loop
            page = await asyncio.to_thread(finish, rollup.spec, q, fetched_rows, after)
        fetched = page.rows
        total = page.matched if q.total else None
        if q.total and total is None:
            counted = count_plan(rollup.spec, source.table, q, stored=source.granularity)
            total = int((await conn.execute(counted)).one()[0])
    # Each fetched row is the fields, then how many stored rows were merged into it.
    rows = [r[:-1] for r in fetched[: q.limit]]
    next_cursor = None
    if len(fetched) > q.limit:
        last = rows[-1]
        index = {f: i for i, f in enumerate(q.fields)}
        values = tuple(last[index[o.column]] for o in q.order)
        next_cursor = cursors.encode(values, q.fingerprint(), q.range, secret)
    rendered = render(
        q,
        rows,
        next_cursor,
        rows_read=sum(int(r[-1]) for r in fetched[: q.limit]),
        total=total,
        source=(source.table.name, source.granularity),
    )
    return Entry(
        body=rendered.body,
        media_type=rendered.media_type,
        etag=etag_for(rendered.body),
        computed_at=time.time(),
        next_cursor=next_cursor,
        rows=len(rows),
        ttl=ttl,
        query_ms=round((time.perf_counter() - started) * 1000, 3),
        total=total,
    )
