"""Ways to upsert one batch's cells into a rollup table, compared (issue 17, item 6: a measurement).

    .venv/bin/python -m bench.upsert_paths [--rows 1000 10000 50000] [--repeats 5] [--no-fsync] [--json out.json]

The table is the default `agg_events_by_type` (bucket, type, source; count, sum/min/max of
properties.amount; its primary key and two indexes, as `tally migrate` creates it). Before each
timed batch it is truncated and seeded (not timed) with the batch's conflicting half plus
SEED_OTHER rows the batch does not touch; so half of the batch's rows update existing rows and
half insert new ones. Each batch is one transaction with one commit, as a flush is. Paths:

- sqlalchemy unnest: the consumer's statement today (consumers.sql `upsert(plan)`: INSERT ...
  SELECT FROM unnest(arrays) ON CONFLICT DO UPDATE), its `params(cells)` and `engine.begin()`,
  as consumers.flush runs it;
- asyncpg unnest: the same statement text and arrays through a raw asyncpg connection;
- copy, temp ON COMMIT DROP: CREATE TEMP TABLE (LIKE the table) ON COMMIT DROP, COPY
  (`copy_records_to_table`) of the cells into it, then one INSERT ... SELECT FROM it ORDER BY
  the key (the consumer's lock order) with the consumer's own ON CONFLICT clause; raw asyncpg;
- copy, temp kept: the same, with a temp table created once per connection ON COMMIT DELETE
  ROWS (so no catalog work per batch); raw asyncpg;
- copy via sqlalchemy: the ON COMMIT DROP variant inside `engine.begin()`, COPY on the
  SQLAlchemy connection's asyncpg connection: how the flush's transaction would do it.
And for reference, not an upsert: COPY alone into an UNLOGGED table of the same columns without
indexes or constraints, truncated before each batch (bench.consumer_throughput's COPY limit).

The Python work each path needs (arrays for unnest, records for COPY) is inside the timing,
and also shown on its own (µs per row). rows/s is the median of --repeats batches per path,
the paths interleaved so that the shared machine's drift spreads over all of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import text

from bench.consumer_throughput import fresh_database, wait_for_postgres

# The consumer's code this benchmark calls, in one place.
from consumers.aggregate import RollupPlan, compile_rollups
from consumers.sql import Upsert, upsert
from core import devstack
from core.db import write_engine
from core.demo import SOURCES, TYPES
from core.migrate import migrate_database
from core.settings import Settings

ROLLUP = "events_by_type"
SEED_OTHER = 50_000  # rows of the table no batch touches (other buckets)
MINUTE = timedelta(minutes=1)
Cells = dict[tuple[Any, ...], list[Any]]  # as consumers.aggregate's: key (bucket, *dimensions) -> measures


def make_cells(rows: int, rng: random.Random) -> tuple[Cells, Cells]:
    """A batch of `rows` cells, and the seed: the batch's conflicting half plus SEED_OTHER rows it does not touch."""
    combos = [(t, s) for t, _ in TYPES for s, _ in SOURCES]
    base = datetime(2024, 10, 4, tzinfo=UTC)  # a minute bucket grid from here

    def cell(minute: int, i: int) -> tuple[tuple[Any, ...], list[Any]]:
        etype, source = combos[i]
        if etype in ("purchase", "add_to_cart"):
            amounts = [Decimal(f"{rng.lognormvariate(3.2, 0.8):.2f}") for _ in range(rng.randint(1, 3))]
            values: list[Any] = [len(amounts), sum(amounts), min(amounts), max(amounts)]
        else:
            values = [rng.randint(1, 40), None, None, None]
        return (base + minute * MINUTE, etype, source), values

    width = len(combos)
    keys = [(m, i) for m in range(-(-(rows + SEED_OTHER) // width)) for i in range(width)]
    batch_keys, other = keys[:rows], keys[rows : rows + SEED_OTHER]
    rng.shuffle(batch_keys)
    batch = dict(cell(m, i) for m, i in batch_keys)
    conflicting = batch_keys[: rows // 2]
    seed = dict(cell(m, i) for m, i in conflicting + other)
    return batch, seed


class Paths:
    def __init__(self, url: str, plan: RollupPlan) -> None:
        self.url = url
        self.plan = plan
        self.up: Upsert = upsert(plan)
        spec = plan.spec
        self.table = spec.table
        self.columns = [*spec.key_columns, *(m.column for m in spec.measures)]
        statement = str(self.up.statement)
        # The same statement with asyncpg's $n placeholders.
        self.dollar = re.sub(r":c(\d+)\b", lambda m: f"${int(m.group(1)) + 1}", statement)
        # The same INSERT and ON CONFLICT clause, reading from the temp table in key order.
        cols = ", ".join(f'"{c}"' for c in self.columns)
        keys = ", ".join(f'"{c}"' for c in spec.key_columns)
        # Identifiers from the validated spec, quoted; no value is in the text.
        select = f"SELECT {cols} FROM tally_upsert_tmp ORDER BY {keys} ON CONFLICT"  # noqa: S608
        from_tmp, n = re.subn(r"SELECT \* FROM unnest\(.*\) ON CONFLICT", select, statement)
        assert n == 1, f"consumers.sql's statement changed shape: {statement}"
        self.from_tmp = from_tmp
        self.engine = write_engine(url, pool_size=1)
        self.conn: asyncpg.Connection | None = None

    async def start(self) -> None:
        self.conn = await asyncpg.connect(self.url)
        await self.conn.execute(f'CREATE TEMP TABLE tally_upsert_kept (LIKE "{self.table}") ON COMMIT DELETE ROWS')
        await self.conn.execute(f'CREATE UNLOGGED TABLE tally_copy_only (LIKE "{self.table}")')

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        await self.engine.dispose()

    def records(self, cells: Cells) -> list[tuple[Any, ...]]:
        return [(*key, *values) for key, values in cells.items()]

    async def seed(self, cells: Cells) -> None:
        assert self.conn is not None
        await self.conn.execute(f'TRUNCATE "{self.table}", tally_copy_only')
        await self.conn.copy_records_to_table(self.table, records=self.records(cells), columns=self.columns)
        await self.conn.execute(f'ANALYZE "{self.table}"')

    async def sqlalchemy_unnest(self, cells: Cells) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(self.up.statement, self.up.params(cells))

    async def asyncpg_unnest(self, cells: Cells) -> None:
        assert self.conn is not None
        params = self.up.params(cells)
        async with self.conn.transaction():
            await self.conn.execute(self.dollar, *(params[f"c{i}"] for i in range(len(params))))

    async def _copy(self, conn: asyncpg.Connection, cells: Cells, tmp: str) -> None:
        await conn.copy_records_to_table(tmp, records=self.records(cells), columns=self.columns)
        await conn.execute(self.from_tmp.replace("tally_upsert_tmp", tmp))

    async def copy_drop(self, cells: Cells) -> None:
        assert self.conn is not None
        async with self.conn.transaction():
            await self.conn.execute(f'CREATE TEMP TABLE tally_upsert_tmp (LIKE "{self.table}") ON COMMIT DROP')
            await self._copy(self.conn, cells, "tally_upsert_tmp")

    async def copy_kept(self, cells: Cells) -> None:
        assert self.conn is not None
        async with self.conn.transaction():
            await self._copy(self.conn, cells, "tally_upsert_kept")

    async def copy_only(self, cells: Cells) -> None:
        assert self.conn is not None
        async with self.conn.transaction():
            await self.conn.copy_records_to_table("tally_copy_only", records=self.records(cells), columns=self.columns)

    async def copy_sqlalchemy(self, cells: Cells) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(text(f'CREATE TEMP TABLE tally_upsert_tmp (LIKE "{self.table}") ON COMMIT DROP'))
            raw = await conn.get_raw_connection()
            await self._copy(raw.driver_connection, cells, "tally_upsert_tmp")


PATHS = ("sqlalchemy unnest", "asyncpg unnest", "copy, temp ON COMMIT DROP", "copy, temp kept",
         "copy via sqlalchemy", "ref: COPY only, no index")


async def run(args: argparse.Namespace, admin_url: str) -> dict[str, Any]:
    await wait_for_postgres(admin_url)
    settings = Settings(env="test", postgres_url=admin_url)
    plan = next(p for p in compile_rollups(settings.rollups) if p.name == ROLLUP)
    out: dict[str, Any] = {"benchmark": "upsert_paths", "table": plan.spec.table, "seed_other_rows": SEED_OTHER,
                           "cores": os.cpu_count(), "postgres_fsync": not args.no_fsync, "repeats": args.repeats,
                           "sizes": {}}
    async with fresh_database(admin_url) as url:
        await migrate_database(settings.model_copy(update={"postgres_url": url}))
        paths = Paths(url, plan)
        await paths.start()
        try:
            runs: dict[str, Callable[[Cells], Awaitable[None]]] = dict(zip(PATHS, (
                paths.sqlalchemy_unnest, paths.asyncpg_unnest, paths.copy_drop, paths.copy_kept,
                paths.copy_sqlalchemy, paths.copy_only), strict=True))
            for rows in args.rows:
                batch, seed = make_cells(rows, random.Random(rows))
                for fn in runs.values():  # warm: prepared statements, the pool, the catalog caches
                    await paths.seed(seed)
                    await fn(batch)
                times: dict[str, list[float]] = {name: [] for name in runs}
                for _ in range(args.repeats):
                    for name, fn in runs.items():
                        await paths.seed(seed)
                        started = time.perf_counter()
                        await fn(batch)
                        times[name].append(time.perf_counter() - started)
                        if name == PATHS[0]:  # the result is the same whatever the path: check one
                            assert paths.conn is not None
                            count = await paths.conn.fetchval(f'SELECT count(*) FROM "{plan.spec.table}"')  # noqa: S608
                            assert count == len(seed) + rows - rows // 2, count
                t = time.perf_counter()
                for _ in range(3):
                    paths.up.params(batch)
                params_us = (time.perf_counter() - t) / 3 / rows * 1e6
                t = time.perf_counter()
                for _ in range(3):
                    paths.records(batch)
                records_us = (time.perf_counter() - t) / 3 / rows * 1e6
                base = rows / statistics.median(times[PATHS[0]])
                out["sizes"][str(rows)] = {
                    "conflicting": rows // 2, "seeded_rows": len(seed),
                    "python_us_per_row": {"unnest arrays (Upsert.params)": round(params_us, 2),
                                          "copy records": round(records_us, 2)},
                    "paths": {name: {"rows_per_s": round(rows / statistics.median(ts)),
                                     "ratio_to_sqlalchemy_unnest": round(rows / statistics.median(ts) / base, 3),
                                     "seconds": [round(x, 4) for x in ts]}
                              for name, ts in times.items()},
                }
        finally:
            await paths.close()
    return out


def measure(*, rows: tuple[int, ...] = (1_000, 10_000, 50_000), repeats: int = 5, fsync: bool = True,
            tmp: Path | None = None) -> dict[str, Any]:
    args = argparse.Namespace(rows=rows, repeats=repeats, no_fsync=not fsync)
    tmp = tmp or Path(tempfile.mkdtemp(prefix="tally-bench-"))
    postgres = devstack.postgres(tmp / "pg" / "data", devstack.free_port(), durable=fsync).start()
    try:
        return asyncio.run(run(args, postgres.url))
    finally:
        postgres.stop()


def report(row: dict[str, Any]) -> list[str]:
    lines = [f"{row['table']}, half of each batch conflicting; seeded with that half + {row['seed_other_rows']:,} "
             f"other rows; one transaction per batch; median of {row['repeats']}; {row['cores']} cores shared; "
             f"Postgres fsync {'on' if row['postgres_fsync'] else 'off'}"]
    for rows, s in row["sizes"].items():
        py = s["python_us_per_row"]
        lines.append(f"-- {int(rows):,} rows ({s['conflicting']:,} conflicting); Python: unnest arrays "
                     f"{py['unnest arrays (Upsert.params)']} µs/row, COPY records {py['copy records']} µs/row")
        for name, p in s["paths"].items():
            lines.append(f"   {name:<27} {p['rows_per_s']:>10,} rows/s  {p['ratio_to_sqlalchemy_unnest']:6.3f}x "
                         "the consumer's statement")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-fsync", action="store_true", help="Postgres with fsync and synchronous_commit off")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    row = measure(rows=tuple(args.rows), repeats=args.repeats, fsync=not args.no_fsync)
    for line in report(row):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
