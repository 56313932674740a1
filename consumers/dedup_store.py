"""De-duplication by `event_id` in Postgres: claims inside the flush transaction, and the window.

The claim. In the flush transaction, after the conditional offset update and
before the upserts, one statement inserts the batch's distinct ids into
`tally_seen_events` (ON CONFLICT DO NOTHING) and returns the ids that were
already there. Those events are not counted; if there are none and no id repeats
within the batch (the common case), the aggregates computed before the
transaction are used as they are, otherwise the counted events are aggregated
again. The claims commit or roll back with the offsets and the upserts, so a
crash, a fenced zombie or a retried flush leaves no claim without its counts and
no counts without their claims: the effect stays exact.

Why it is exact under concurrency. Ids live in one partition per UTC day, keyed
(event_id, day); "seen" means present in today's partition or in one of the
previous `window_days` partitions. Two consumers claiming the same id on the same
day meet on today's unique index: the second waits for the first and counts the
event only if the first rolls back. The day boundary needs care: a transaction
that started before midnight may still be open when one started after midnight
looks at yesterday's partition, which cannot see uncommitted rows. So (1) in the
first MARGIN (30 min) of a day, a claim also inserts its ids into yesterday's
partition, meeting any transaction of the day before on that unique index; and
(2) a transaction that started before a midnight refuses to commit later than
COMMIT_DEADLINE (15 min) after it: it rolls back and is retried. After the margin,
every transaction of the previous day has therefore committed or rolled back, and
a plain look at yesterday's partition is exact. Days come from the database's
transaction timestamp, one clock for every consumer.

Why partitions by day. Expiry must be cheap and must not get in the consumer's
way. A DELETE by `seen_at` would rewrite a day of ids into the WAL, leave as many
dead tuples and make vacuum walk a random-UUID index as large as the table, every
day, competing with the claims. Instead a day's ids are one table: expiry is
`DETACH PARTITION ... CONCURRENTLY` (a SHARE UPDATE EXCLUSIVE lock, which
does not conflict with the claims' inserts and reads; it only waits for older
transactions to end) and `DROP TABLE` of the detached table, which nothing uses
any more. New days are created ahead of time as plain tables and attached with
`ATTACH PARTITION` (also SHARE UPDATE EXCLUSIVE), never with `CREATE TABLE ...
PARTITION OF`, which would take an ACCESS EXCLUSIVE lock on the parent. The claim's
day bounds are stable expressions, so partitions outside the window are pruned
when the statement starts and a lookup probes one index per day checked. Needs
PostgreSQL 14 or later (DETACH ... CONCURRENTLY).

An id is remembered for at least `TALLY_DEDUP_WINDOW_HOURS` and at most one day
longer (whole UTC days are dropped). Consumers create partitions when they start
and hourly (the database role needs CREATE on the schema), and expire old ones in
a background task; advisory locks keep several consumers from doing it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Final

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from consumers.aggregate import Aggregates, RollupPlan, aggregate
from consumers.dedup import (
    MARGIN,
    Candidates,
    commit_too_late,
    counted,
    days_to_create,
    expired,
    partition_day,
    partition_name,
    window_days,
)
from core.db import write_engine

log = logging.getLogger(__name__)

TABLE: Final = "tally_seen_events"
AHEAD_DAYS: Final = 2  # partitions created ahead of today
MAINTAIN_SECONDS: Final = 3600.0
_CREATE_LOCK: Final = 0x7A11_5EE1
_EXPIRE_LOCK: Final = 0x7A11_5EE2

# The database's clock (or, in tests, `:at`), in UTC, and the two day bounds derived from it.
# Stable expressions, so partition pruning happens when the statement starts.
_AT = "(COALESCE(CAST(:at AS timestamptz), transaction_timestamp()) AT TIME ZONE 'UTC')"
_TODAY = f"CAST({_AT} AS date)"
_NEAR = f"(CAST({_AT} AS time) < CAST(:margin AS time))"

# Returns the transaction's timestamp and the ids that were already claimed. Only constants are
# formatted in; every value is a bound parameter.
CLAIM = text(
    f"""
WITH ids AS MATERIALIZED (
    SELECT CAST(u AS uuid) AS event_id FROM unnest(CAST(:ids AS text[])) AS u
),
prev AS (
    INSERT INTO {TABLE} (event_id, day)
    SELECT event_id, {_TODAY} - 1 FROM ids WHERE {_NEAR} ORDER BY event_id
    ON CONFLICT DO NOTHING RETURNING event_id
),
cur AS (
    INSERT INTO {TABLE} (event_id, day)
    SELECT i.event_id, {_TODAY} FROM ids i
    WHERE NOT EXISTS (
        SELECT 1 FROM {TABLE} s
        WHERE s.event_id = i.event_id
          AND s.day >= {_TODAY} - CAST(:days AS integer)
          AND s.day < {_TODAY} - CASE WHEN {_NEAR} THEN 1 ELSE 0 END
    )
    ORDER BY i.event_id
    ON CONFLICT DO NOTHING RETURNING event_id
)
SELECT COALESCE(CAST(:at AS timestamptz), transaction_timestamp()) AS at, ARRAY(
    SELECT CAST(i.event_id AS text) FROM ids i
    WHERE NOT EXISTS (SELECT 1 FROM cur c WHERE c.event_id = i.event_id)
       OR ({_NEAR} AND NOT EXISTS (SELECT 1 FROM prev p WHERE p.event_id = i.event_id))
) AS seen
"""  # noqa: S608
)
_PARTITIONS = text(
    "SELECT c.relname, i.inhdetachpending FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "WHERE i.inhparent = CAST('tally_seen_events' AS regclass)"
)
_LEFTOVERS = text(  # detached by an expiry that stopped before its DROP
    "SELECT c.relname FROM pg_class c WHERE c.relkind = 'r' AND NOT c.relispartition "
    "AND c.relname LIKE 'tally\\_seen\\_events\\_p%' AND pg_table_is_visible(c.oid)"
)
_MARGIN_TIME: Final = (datetime.min.replace(tzinfo=UTC) + MARGIN).time()
_DB_TODAY = text("SELECT CAST(now() AT TIME ZONE 'UTC' AS date)")


class LateCommit(TimeoutError):
    """A claim's transaction ran too far past the UTC midnight after its start: roll back, retry."""


@dataclass(frozen=True, slots=True)
class Claimed:
    """What a claim changed: the aggregates to upsert and how many events were not counted."""

    aggregates: Aggregates
    duplicates: int
    at: datetime | None  # the transaction's timestamp (database clock); None if nothing was claimed
    opened: float  # time.monotonic() before the transaction began

    def check_commit(self) -> None:
        """Call last before COMMIT: raise LateCommit if committing now could break exactness."""
        if self.at is not None and commit_too_late(self.at, time.monotonic() - self.opened):
            raise LateCommit(f"a claim made at {self.at.isoformat()} is still uncommitted past midnight")


async def claim_ids(
    conn: AsyncConnection, ids: Sequence[str], *, window_hours: int, at: datetime | None = None
) -> tuple[datetime, list[str]]:
    """Claim canonical ids in the transaction of `conn`: (its timestamp, the ids already claimed).

    `ids` must be distinct (Candidates.distinct is): the statement does not spend a sort on it.
    """
    row = (
        await conn.execute(
            CLAIM, {"ids": list(ids), "days": window_days(window_hours), "margin": _MARGIN_TIME, "at": at}
        )
    ).one()
    return row[0], list(row[1])


async def claim(
    conn: AsyncConnection,
    candidates: Candidates,
    aggregates: Aggregates,
    plans: Sequence[RollupPlan],
    *,
    window_hours: int,
    opened: float,
    at: datetime | None = None,
) -> Claimed:
    """Claim the batch's ids; the aggregates of the events that still count (`aggregates` if all do)."""
    if not candidates.distinct:
        return Claimed(aggregates, 0, None, opened)
    started_at, seen = await claim_ids(conn, candidates.distinct, window_hours=window_hours, at=at)
    if not seen and not candidates.repeats:
        return Claimed(aggregates, 0, started_at, opened)
    kept = counted(candidates, seen)
    fresh = await asyncio.to_thread(aggregate, plans, kept)
    return Claimed(fresh, len(candidates.events) - len(kept), started_at, opened)


async def partitions(conn: AsyncConnection) -> dict[date, tuple[str, bool]]:
    """Attached partitions by day: (name, detach pending)."""
    out: dict[date, tuple[str, bool]] = {}
    for name, pending in (await conn.execute(_PARTITIONS)).all():
        day = partition_day(name)
        if day is not None:
            out[day] = (name, bool(pending))
    return out


async def ensure_partitions(engine: AsyncEngine, *, today: date | None = None) -> date:
    """Create and attach the partitions a claim may insert into; the last day that now has one."""
    async with engine.begin() as conn:
        if (await conn.execute(text(f"SELECT to_regclass('{TABLE}')"))).scalar() is None:
            raise RuntimeError(f"{TABLE} does not exist: run `tally migrate` (TALLY_DEDUP needs it)")
        await conn.execute(text("SET LOCAL lock_timeout = '10s'"))
        await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CREATE_LOCK})
        today = today or (await conn.execute(_DB_TODAY)).scalar_one()
        have = await partitions(conn)
        wanted = days_to_create(today, AHEAD_DAYS)
        for day in wanted:
            if day in have:
                continue
            name = partition_name(day)
            # Identifiers are built from dates only; bounds are date literals.
            await conn.execute(
                text(f"CREATE TABLE IF NOT EXISTS {name} (LIKE {TABLE} INCLUDING DEFAULTS INCLUDING INDEXES)")
            )
            bounds = f"FROM ('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')"
            await conn.execute(text(f"ALTER TABLE {TABLE} ATTACH PARTITION {name} FOR VALUES {bounds}"))
            log.info("dedup: partition %s attached", name)
        return wanted[-1]


async def expire_partitions(engine: AsyncEngine, window_hours: int, *, today: date | None = None) -> list[str]:
    """Detach (concurrently) and drop the partitions older than the window; the names dropped.

    Skipped when another process is already doing it.
    """
    dropped: list[str] = []
    async with engine.connect() as base:
        conn = await base.execution_options(isolation_level="AUTOCOMMIT")
        if not (await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _EXPIRE_LOCK})).scalar():
            return dropped
        try:
            today = today or (await conn.execute(_DB_TODAY)).scalar_one()
            attached = await partitions(conn)
            for day in expired(list(attached), today, window_hours):
                name, pending = attached[day]
                how = "FINALIZE" if pending else "CONCURRENTLY"
                await conn.execute(text(f"ALTER TABLE {TABLE} DETACH PARTITION {name} {how}"))
                await conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
                dropped.append(name)
            loose = {d: n for n in (await conn.execute(_LEFTOVERS)).scalars() if (d := partition_day(n)) is not None}
            for day in expired(list(loose), today, window_hours):
                await conn.execute(text(f"DROP TABLE IF EXISTS {loose[day]}"))
                dropped.append(loose[day])
        finally:
            with contextlib.suppress(Exception):
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _EXPIRE_LOCK})
    if dropped:
        log.info("dedup: expired %s", ", ".join(dropped))
    return dropped


class Dedup:
    """One consumer's de-duplication: claims in its flushes, and the partitions' upkeep."""

    def __init__(self, engine: AsyncEngine, window_hours: int) -> None:
        self.engine = engine
        self.window_hours = window_hours
        self.at: datetime | None = None  # tests: claim as if the database's clock said this
        self._ready_through: date | None = None
        self._next_upkeep = 0.0
        self._expiring: asyncio.Task[None] | None = None

    async def maintain(self) -> None:
        """Before a flush: partitions exist for today and tomorrow; hourly, old ones expire (in the background)."""
        tomorrow = datetime.now(UTC).date() + timedelta(days=1)
        ready = self._ready_through is not None and tomorrow <= self._ready_through
        if ready and time.monotonic() < self._next_upkeep:
            return
        self._ready_through = await ensure_partitions(self.engine)
        self._next_upkeep = time.monotonic() + MAINTAIN_SECONDS
        if self._expiring is None or self._expiring.done():
            self._expiring = asyncio.create_task(self._expire(), name="tally-dedup-expiry")

    async def _expire(self) -> None:
        # A connection of its own: a DETACH waiting for older transactions must not hold one of the
        # consumer's few pooled connections (flushes, offset loads, readiness checks).
        url = self.engine.url.render_as_string(hide_password=False)
        engine = write_engine(url, pool_size=1, app="tally-dedup-expiry")
        try:
            await expire_partitions(engine, self.window_hours)
        except Exception as exc:  # the next hour tries again; claims do not depend on it
            log.warning("dedup: expiring old partitions failed (%s: %s)", type(exc).__name__, exc)
        finally:
            await engine.dispose()

    async def claim(
        self,
        conn: AsyncConnection,
        candidates: Candidates,
        aggregates: Aggregates,
        plans: Sequence[RollupPlan],
        *,
        opened: float,
    ) -> Claimed:
        return await claim(
            conn, candidates, aggregates, plans, window_hours=self.window_hours, opened=opened, at=self.at
        )

    async def close(self) -> None:
        task, self._expiring = self._expiring, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
