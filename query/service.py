"""Run one planned rollup query on the read engine and render it into a cacheable entry (Postgres I/O)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from core import metrics
from core.db import ReadEngine
from core.problems import Unavailable
from query import cursor as cursors
from query.cache_policy import Entry, Ttl, etag_for
from query.catalog import Rollup
from query.cursor import Value
from query.params import RollupQuery
from query.planner import count_plan, plan
from query.render import render

_QUERY_CANCELED = "57014"  # statement_timeout


@contextlib.asynccontextmanager
async def database_errors(engine: ReadEngine) -> AsyncIterator[None]:
    """Turn a timed-out query or an unreachable, saturated database into a 503 with Retry-After."""
    try:
        yield
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == _QUERY_CANCELED:
            raise Unavailable(
                "the query ran past the statement timeout: narrow the range or filter", retry_after=5
            ) from exc
        if exc.connection_invalidated or isinstance(exc.orig, OSError):
            raise Unavailable("the database is unreachable", retry_after=1) from exc
        raise
    except (PoolTimeout, OSError) as exc:
        raise Unavailable("the database is unreachable or saturated", retry_after=1) from exc
    finally:
        metrics.db_pool_in_use.labels("query").set(engine.pool.checkedout())  # type: ignore[attr-defined]


async def run_query(
    engine: ReadEngine,
    rollup: Rollup,
    q: RollupQuery,
    after: Sequence[Value] | None,
    *,
    secret: str,
    ttl: Ttl,
    reason: str,
) -> Entry:
    started = time.perf_counter()
    metrics.query_computations.labels(q.rollup, reason).inc()
    total: int | None = None
    async with database_errors(engine), engine.connect() as conn:
        metrics.db_pool_in_use.labels("query").set(engine.pool.checkedout())  # type: ignore[attr-defined]
        fetched: list[tuple[Any, ...]] = [
            tuple(r) for r in (await conn.execute(plan(rollup.spec, rollup.table, q, after))).all()
        ]
        if q.total:
            total = int((await conn.execute(count_plan(rollup.spec, rollup.table, q))).one()[0])
    # Each fetched row is the fields, then how many stored rows were merged into it.
    rows = [r[:-1] for r in fetched[: q.limit]]
    next_cursor = None
    if len(fetched) > q.limit:
        last = rows[-1]
        index = {f: i for i, f in enumerate(q.fields)}
        values = tuple(last[index[o.column]] for o in q.order)
        next_cursor = cursors.encode(values, q.fingerprint(), q.range, secret)
    rendered = render(q, rows, next_cursor, rows_read=sum(int(r[-1]) for r in fetched[: q.limit]), total=total)
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
