"""Run one planned rollup query on the read engine and render it into a cacheable entry (Postgres I/O)."""

from __future__ import annotations

import time
from collections.abc import Sequence
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
from query.planner import plan
from query.render import render

_QUERY_CANCELED = "57014"  # statement_timeout


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
    stmt = plan(rollup.spec, rollup.table, q, after)
    metrics.query_computations.labels(q.rollup, reason).inc()
    try:
        async with engine.connect() as conn:
            metrics.db_pool_in_use.labels("query").set(engine.pool.checkedout())  # type: ignore[attr-defined]
            rows: list[tuple[Any, ...]] = [tuple(r) for r in (await conn.execute(stmt)).all()]
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
    next_cursor = None
    if len(rows) > q.limit:
        rows = rows[: q.limit]
        last = rows[-1]
        index = {f: i for i, f in enumerate(q.fields)}
        values = tuple(last[index[o.column]] for o in q.order)
        next_cursor = cursors.encode(values, q.fingerprint(), q.range, secret)
    rendered = render(q, rows, next_cursor, (time.perf_counter() - started) * 1000)
    return Entry(
        body=rendered.body,
        media_type=rendered.media_type,
        etag=etag_for(rendered.body),
        computed_at=time.time(),
        next_cursor=next_cursor,
        rows=len(rows),
        ttl=ttl,
    )
