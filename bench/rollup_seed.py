"""Fill `agg_events_by_type` with N realistic rollup rows in one server-side statement.

Benchmarks and plan tests need a table of production-like size (a week of minute
buckets is ~1.5M rows); going through ingest and the consumer would take minutes,
and client-side inserts most of a minute. `INSERT ... SELECT FROM generate_series`
writes them inside Postgres in seconds, with the same indexes the consumer
maintains. Rows are a dense grid, in bucket order (as the consumer appends them):
every minute holds every (type, source) pair, so a filter on one type keeps
1/len(types) of a range and one source 1/len(sources). Values are deterministic
functions of the row number; `page_view` rows and every 11th row have NULL amounts
(events without a numeric `properties.amount`). When the rollup declares coarser
tables (`granularities`, issue 18), they are rebuilt from the seeded rows with
core.coarse, as the consumer would have kept them, so a query that reads them sees
the same data. ANALYZE follows, so the planner sees the new statistics at once
instead of whenever autovacuum gets to them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
from sqlalchemy.engine import make_url

from core.coarse import fill_coarse_tables_at
from core.settings import DEFAULT_ROLLUPS
from schemas.rollups import RollupSpec, load_rollups

TABLE = "agg_events_by_type"
TYPES: tuple[str, ...] = (
    "page_view",
    "click",
    "search",
    "add_to_cart",
    "purchase",
    "signup",
    "login",
    "logout",
    "share",
    "error",
)
SOURCES: tuple[str, ...] = (
    "web",
    "ios",
    "android",
    "api",
    "email",
    "push",
    "sms",
    "ads",
    "partner_a",
    "partner_b",
    "partner_c",
    "import",
    "kiosk",
    "tv",
    "",  # a missing source is stored as ''
)

# Row i: minute i // (types * sources), type (i // sources) % types, source i % sources.
# count in 1..97; per row one amount `hi` and count-1 amounts `lo`, so sum = lo*(count-1) + hi,
# min = lo, max = hi (hi = lo when count is 1): the measures stay consistent with each other.
_SEED = """
INSERT INTO agg_events_by_type
    (bucket, type, source, count, sum_properties_amount, min_properties_amount, max_properties_amount)
SELECT bucket, type, source, count,
       CASE WHEN has_amount THEN lo * (count - 1) + hi END,
       CASE WHEN has_amount THEN lo END,
       CASE WHEN has_amount THEN hi END
FROM (
    SELECT $1::timestamptz + (i / $2::bigint) * interval '1 minute' AS bucket,
           ($4::text[])[1 + (i / $3::bigint) % cardinality($4::text[])] AS type,
           ($5::text[])[1 + i % $3::bigint] AS source,
           1 + (i * 7919) % 97 AS count,
           ((i * 13) % 500 + 1) * 0.01 AS lo,
           ((i * 13) % 500 + 1) * 0.01 + CASE WHEN (i * 7919) % 97 = 0 THEN 0 ELSE ((i * 17) % 1000) * 0.01 END AS hi,
           ($4::text[])[1 + (i / $3::bigint) % cardinality($4::text[])] <> 'page_view' AND i % 11 <> 0 AS has_amount
    FROM generate_series(0::bigint, $6::bigint - 1) AS i
) AS g
"""


@dataclass(frozen=True, slots=True)
class Seeded:
    """What was written: buckets start at `start` (inclusive) and end before `end`."""

    start: datetime
    end: datetime
    rows: int
    types: tuple[str, ...]
    sources: tuple[str, ...]

    @property
    def rows_per_minute(self) -> int:
        return len(self.types) * len(self.sources)


def default_end(now: datetime | None = None) -> datetime:
    """Midnight UTC eight days ago: every range in the data then ends before the 7-day
    lateness window, so the query cache treats it as closed (immutable, cached long)."""
    now = now or datetime.now(UTC)
    return now.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=8)


def plain_url(url: str) -> str:
    """asyncpg takes `postgresql://` only; accept the `postgresql+asyncpg://` form too."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def seed_rollup(
    url: str,
    rows: int,
    *,
    end: datetime | None = None,
    types: tuple[str, ...] = TYPES,
    sources: tuple[str, ...] = SOURCES,
    spec: RollupSpec | None = None,
) -> Seeded:
    """Insert `rows` rows into an empty, migrated `agg_events_by_type` ending just before `end`
    (default `default_end()`), fill its coarse tables, then ANALYZE them all. Returns the range
    the buckets cover. `spec` is the rollup as migrated (default: core/rollups.toml's)."""
    if rows < 1:
        raise ValueError("rows must be at least 1")
    per_minute = len(types) * len(sources)
    end = end or default_end()
    start = end - timedelta(minutes=math.ceil(rows / per_minute))
    conn = await asyncpg.connect(plain_url(url))
    try:
        # No statement timeout for the bulk insert, whatever the role's default is.
        await conn.execute("SET statement_timeout = 0")
        await conn.execute(_SEED, start, per_minute, len(sources), list(types), list(sources), rows)
    finally:
        await conn.close()
    await fill_coarse(url, spec or default_spec())
    return Seeded(start=start, end=end, rows=rows, types=types, sources=sources)


def default_spec() -> RollupSpec:
    """`events_by_type` as the shipped rollups file declares it (what `tally migrate` made by default)."""
    return next(s for s in load_rollups(DEFAULT_ROLLUPS) if s.table == TABLE)


async def fill_coarse(url: str, spec: RollupSpec) -> None:
    """Rebuild `spec`'s coarse tables from its seeded base table, then ANALYZE every table of it."""
    conn = await asyncpg.connect(plain_url(url))
    try:
        await conn.execute("SET statement_timeout = 0")
        present = [await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", t) for t in spec.tables]
        if not all(present):
            missing = [t for t, there in zip(spec.tables, present, strict=True) if not there]
            raise RuntimeError(f"{', '.join(missing)} missing: migrate with the rollups file that declares them")
        if spec.coarse_granularities:
            await fill_coarse_tables_at(url, [spec])
        for table in spec.tables:
            await conn.execute(f'ANALYZE "{table}"')
    finally:
        await conn.close()
