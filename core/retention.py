"""Retention: delete each rollup's buckets older than its `retention`, in short batches.

Why batched DELETEs and not time-partitioned tables (where expiry is a DROP of a
whole partition, as `tally_seen_events` does for de-duplication ids):
- rollup tables hold aggregates, one row per bucket and dimension values, so what
  expires in an hour is about an hour's rows: a few thousand-row deletes, which
  vacuum turns into space the next buckets reuse, so the table stays the same size;
- `tally migrate` makes plain tables and existing deployments have data in them:
  partitioning would mean rewriting every table, and creating partitions ahead of
  time forever (an insert into a missing partition fails and would wedge a consumer),
  for every granularity and retention a user may declare;
- dropping or detaching a partition needs a stronger lock than a DELETE, which
  takes only row locks that queries (MVCC reads) never wait for.

Each batch is one statement in its own short transaction: it picks at most
`TALLY_RETENTION_BATCH_ROWS` rows, oldest first through the primary key (its first
column is `bucket`), `FOR UPDATE SKIP LOCKED` so it never waits for a row a
consumer is writing (that row is left for the next run), and starts where the
previous batch stopped, so index entries of rows already deleted are not walked
again before vacuum cleans them. `lock_timeout` keeps a batch from queueing behind
a migration's DDL (and everyone else behind it). A pause between batches leaves
Postgres to the consumers and queries.

One runner at a time: the job holds a session-level advisory lock on its
connection, so the consumers' periodic runs (`TALLY_RETENTION_INTERVAL_SECONDS`)
and a cron'd `tally retention` skip while another runs; Postgres frees the lock
if the runner dies. Running it again changes nothing once nothing is expired.

Coarse tables (`granularities`): each is expired by the rollup's retention with the
cut-off floored to its own granularity, so the bucket the horizon falls in is kept
whole in every table (a day table keeps the horizon's whole day while the minute
table has lost its first minutes: at that one edge bucket the coarse table holds
more than the base table re-bucketed, by design). Nothing else differs: an event the
consumers skip as expired is past the base table's cut-off, which is never before a
coarse table's, so it is counted in no table.

Late events: a consumer skips events in buckets older than `now - retention`
(floored to the granularity; consumers.aggregate), counted in
`tally_consumer_expired_events_total`. This job deletes only buckets older than
`now - retention - TALLY_RETENTION_GRACE_SECONDS`, so a batch a consumer prepared
(by its own clock) before a delete cannot commit a row into a bucket already
deleted, unless its transaction or the clocks' skew outlast the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter, Gauge
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from core.db import asyncpg_url
from core.settings import Settings
from schemas.rollups import RollupSpec, expiry_cutoff_ms

log = logging.getLogger(__name__)

LOCK_ID = 0x7A11_DE1E  # pg_try_advisory_lock key: one retention runner per database
LOCK_TIMEOUT = "2s"  # a batch waiting longer for a table lock (DDL) fails instead of queueing
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LOWEST = datetime(1, 1, 1, tzinfo=UTC)

expired_events = Counter(
    "tally_consumer_expired_events_total",
    "Events not counted because their bucket is older than the rollup's retention",
    ["rollup"],
)
deleted_rows = Counter("tally_retention_deleted_rows_total", "Rollup rows deleted by retention", ["rollup"])
runs = Counter("tally_retention_runs_total", "Retention runs: done, skipped (another runs), failed", ["outcome"])
last_success = Gauge(
    "tally_retention_last_success_timestamp_seconds",
    "When a retention run last finished (Unix time)",
    multiprocess_mode="max",
)


class RetentionError(RuntimeError):
    """A retention run that cannot proceed; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Batch:
    rows: int
    xid: int | None  # the transaction that deleted them (None when it deleted nothing)


@dataclass
class RollupRetention:
    """One table's run: a rollup's base table, or one of its coarse tables (`table` says which)."""

    rollup: str
    retention: str
    cutoff: datetime  # buckets before this were deleted (or, in a dry run, would be)
    deleted: int = 0
    batches: list[Batch] = field(default_factory=list)
    table: str = ""


@dataclass
class RetentionReport:
    ran: bool  # False: another runner held the lock, nothing was done
    rollups: list[RollupRetention] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def deleted(self) -> int:
        return sum(r.deleted for r in self.rollups)


def delete_cutoff(spec: RollupSpec, now: datetime, grace: timedelta, granularity: str | None = None) -> datetime:
    """Buckets before this are deleted: the consumers' cut-off `grace` earlier, floored to the table's
    granularity (default: the base's), so a coarse table keeps the horizon's bucket whole."""
    if spec.retention is None:
        raise ValueError(f"rollup {spec.name} keeps every bucket: it has no cut-off")
    now_ms = (now - grace - _EPOCH) // timedelta(milliseconds=1)
    return _EPOCH + timedelta(milliseconds=expiry_cutoff_ms(now_ms, spec.retention, granularity or spec.granularity))


def short_retentions(settings: Settings) -> list[str]:
    """Warnings for rollups keeping less than ingest's lateness window: their late events are not counted."""
    lateness = timedelta(seconds=settings.lateness_seconds)
    return [
        f"rollup {s.name} keeps {s.retention_text}, less than TALLY_LATENESS_SECONDS ({lateness}): events "
        "accepted that late are not counted in it (tally_consumer_expired_events_total)"
        for s in settings.rollups
        if s.retention is not None and s.retention < lateness
    ]


def _engine(settings: Settings) -> AsyncEngine:
    settings.require("postgres_url")
    server_settings = {"application_name": "tally-retention", "lock_timeout": LOCK_TIMEOUT}
    return create_async_engine(
        asyncpg_url(str(settings.postgres_url)),
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",  # each statement, so each batch, is its own transaction
        connect_args={"server_settings": server_settings, "timeout": 5},
    )


def _batch_sql(table: str) -> str:
    quoted = '"' + table.replace('"', '""') + '"'
    # Identifiers come from validated rollup specs and are quoted; values are bound.
    return (
        f"WITH picked AS (SELECT ctid, bucket FROM {quoted} WHERE bucket >= :lower AND bucket < :cutoff "  # noqa: S608
        "ORDER BY bucket LIMIT :rows FOR UPDATE SKIP LOCKED), "
        f"gone AS (DELETE FROM {quoted} WHERE ctid = ANY(ARRAY(SELECT ctid FROM picked)) RETURNING bucket) "
        # picked, not deleted, decides the end: a row a writer updated during the statement is
        # picked (locked at its new version) but not deleted (invisible to this statement's snapshot)
        "SELECT count(*), (SELECT count(*) FROM picked), (SELECT max(bucket) FROM picked), "
        "CAST(pg_current_xact_id_if_assigned() AS text) FROM gone"
    )


async def _check_tables(conn: AsyncConnection, specs: Sequence[RollupSpec]) -> None:
    for spec in specs:
        for table in spec.tables:
            if (await conn.execute(text("SELECT to_regclass(:t)"), {"t": table})).scalar() is None:
                raise RetentionError(f"table {table} does not exist: run `tally migrate`")


async def _expire(
    conn: AsyncConnection,
    spec: RollupSpec,
    table: str,
    cutoff: datetime,
    settings: Settings,
    stop: asyncio.Event | None,
) -> RollupRetention:
    """Delete the table's rows before `cutoff`, one short transaction per batch, oldest first."""
    out = RollupRetention(spec.name, spec.retention_text or "", cutoff, table=table)
    statement = text(_batch_sql(table))
    lower, rows = _LOWEST, settings.retention_batch_rows
    while True:
        count, picked, reached, xid = (
            await conn.execute(statement, {"lower": lower, "cutoff": cutoff, "rows": rows})
        ).one()
        out.batches.append(Batch(int(count), None if xid is None else int(xid)))
        out.deleted += int(count)
        if count:
            deleted_rows.labels(spec.name).inc(int(count))
        if picked < rows or (stop is not None and stop.is_set()):
            return out
        lower = reached  # rows of this bucket may remain (other dimension values): start at it, not after
        if settings.retention_pause_seconds:
            await asyncio.sleep(settings.retention_pause_seconds)


async def run_retention(
    settings: Settings,
    *,
    now: datetime | None = None,
    dry_run: bool = False,
    stop: asyncio.Event | None = None,
) -> RetentionReport:
    """Delete every rollup's expired buckets, unless another runner holds the lock (then `ran` is False).

    `dry_run` counts the rows that would go, without the lock and without deleting.
    """
    started = time.monotonic()
    now = datetime.now(UTC) if now is None else now
    grace = timedelta(seconds=settings.retention_grace_seconds)
    specs = [s for s in settings.rollups if s.retention is not None]
    report = RetentionReport(ran=False)
    if not specs:
        report.ran = True
        return report
    engine = _engine(settings)
    try:
        async with engine.connect() as conn:
            await _check_tables(conn, specs)
            if dry_run:
                for spec in specs:
                    for granularity in spec.granularities:
                        table = spec.table_for(granularity)
                        cutoff = delete_cutoff(spec, now, grace, granularity)
                        quoted = '"' + table.replace('"', '""') + '"'
                        count = await conn.execute(
                            text(f"SELECT count(*) FROM {quoted} WHERE bucket < :cutoff"),  # noqa: S608 - quoted spec name
                            {"cutoff": cutoff},
                        )
                        report.rollups.append(
                            RollupRetention(
                                spec.name, spec.retention_text or "", cutoff, count.scalar_one(), table=table
                            )
                        )
                report.ran = True
                return report
            if not (await conn.execute(text("SELECT pg_try_advisory_lock(:id)"), {"id": LOCK_ID})).scalar():
                runs.labels("skipped").inc()
                log.info("retention: another runner holds the lock; nothing done")
                return report
            try:
                for spec, granularity in ((s, g) for s in specs for g in s.granularities):
                    cutoff = delete_cutoff(spec, now, grace, granularity)
                    report.rollups.append(
                        await _expire(conn, spec, spec.table_for(granularity), cutoff, settings, stop)
                    )
                    if stop is not None and stop.is_set():
                        break
            finally:
                with contextlib.suppress(Exception):  # a closed connection has released it anyway
                    await conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": LOCK_ID})
    except Exception:
        runs.labels("failed").inc()
        raise
    finally:
        await engine.dispose()
    report.ran = True
    report.seconds = time.monotonic() - started
    runs.labels("done").inc()
    last_success.set(time.time())
    for r in report.rollups:
        log.info(
            "retention: %s (keeps %s): deleted %d rows before %s in %d batches",
            _named(r),
            r.retention,
            r.deleted,
            r.cutoff.isoformat(),
            len(r.batches),
        )
    return report


async def run_periodically(settings: Settings, stop: asyncio.Event) -> None:
    """A consumer's retention loop: a first run at a random moment of the first interval (at most a
    minute), so consumers started together do not all try at once, then every interval; the lock
    lets one of them delete while the others skip. A failed run is logged and tried next time."""
    interval = settings.retention_interval_seconds
    if interval <= 0 or all(s.retention is None for s in settings.rollups):
        return
    delay = min(interval, 60.0) * random.random()  # noqa: S311 - jitter, not cryptography
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return
        try:
            await run_retention(settings, stop=stop)
        except Exception as exc:  # Postgres down, a lock timeout: the next interval tries again
            log.warning("retention run failed (%s: %s); next try in %.0f s", type(exc).__name__, exc, interval)
        delay = interval


def start_periodic(settings: Settings, stop: asyncio.Event) -> asyncio.Task[None]:
    return asyncio.create_task(run_periodically(settings, stop), name="tally-retention")


async def stop_periodic(task: asyncio.Task[None] | None, stop: asyncio.Event, grace: float = 5.0) -> None:
    """End the loop: with `stop` set it returns after the batch in hand; past `grace`, or when the
    consumer stops for another reason, it is cancelled (a batch in flight rolls back: one statement)."""
    if task is None:
        return
    if stop.is_set():
        await asyncio.wait({task}, timeout=grace)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _named(r: RollupRetention) -> str:
    """The rollup's name, and the table's when it is a coarse one (`by_type (agg_by_type__hour)`)."""
    return r.rollup if not r.table or r.table == f"agg_{r.rollup}" else f"{r.rollup} ({r.table})"


def format_report(report: RetentionReport, *, dry_run: bool = False) -> str:
    if not report.ran:
        return "another retention run holds the lock; nothing done"
    if not report.rollups:
        return "no rollup declares a retention; nothing to delete"
    verb = "would delete" if dry_run else "deleted"
    lines = [
        f"{_named(r)}: keeps {r.retention}; {verb} {r.deleted} rows with buckets before {r.cutoff.isoformat()}"
        + ("" if dry_run else f" in {len(r.batches)} batches")
        for r in report.rollups
    ]
    return "\n".join(lines)
