"""`tally migrate`: create the topics, the offsets table and every declared rollup table.

Idempotent: tables and indexes that exist are kept, new rollups are added, removed
ones retired, and a changed definition is refused (see core.registry). A Postgres
advisory lock keeps concurrent migrations from racing.

A coarse table added to a rollup (`granularities`) is filled from the base table in
the migration's transaction, after `LOCK TABLE tally_offsets IN SHARE MODE`: that
waits for every consumer transaction that already moved its offsets (their base rows
are then committed, and counted by the fill) and holds back the rest until the
migration has committed the new `rollups_version`; Postgres reads the version after
the lock is granted, so those are fenced, and none of their batches is missed by
the new table or counted twice. Consumers wait for the length of the fill.
"""

from __future__ import annotations

import logging

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from core.coarse import fill_coarse_tables
from core.db import write_engine
from core.kafka import ensure_topics
from core.registry import RegisteredRollup, RegistryPlan, plan_registry
from core.retention import short_retentions
from core.settings import Settings
from schemas.rollups import definition, fingerprint, parse_stored_text, stored_text
from schemas.tables import build_metadata

log = logging.getLogger(__name__)
_LOCK_ID = 0x7A11_7A11


async def migrate_database(settings: Settings) -> None:
    settings.require("postgres_url")
    metadata = build_metadata(settings.rollups)
    engine = write_engine(str(settings.postgres_url), pool_size=1, app="tally-migrate")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
            plan = plan_registry(await _registered(conn), settings.rollups)  # refuses before changing anything
            await conn.run_sync(metadata.create_all)
            # create_all adds indexes only to new tables; add any declared since.
            for table in metadata.sorted_tables:
                for index in table.indexes:
                    await conn.run_sync(index.create, checkfirst=True)
            await _apply(conn, plan)
    finally:
        await engine.dispose()
    log.info("database ready: %s", ", ".join(s.table for s in settings.rollups))
    for warning in short_retentions(settings):  # allowed (a choice), but worth saying out loud
        log.warning("%s", warning)


async def _registered(conn: AsyncConnection) -> dict[str, RegisteredRollup]:
    if (await conn.execute(text("SELECT to_regclass('tally_rollups')"))).scalar() is None:
        return {}
    # A registry made before coarse tables: its rollups store their base granularity only (NULL).
    # Altered only when missing: ALTER TABLE holds an exclusive lock until the migration commits.
    has = text(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns "
        "WHERE table_name = 'tally_rollups' AND column_name = 'granularities' AND table_schema = current_schema())"
    )
    if not (await conn.execute(has)).scalar():
        await conn.execute(text("ALTER TABLE tally_rollups ADD COLUMN granularities text"))
    rows = await conn.execute(
        text("SELECT name, fingerprint, retired_at IS NOT NULL, granularities, definition FROM tally_rollups")
    )
    return {
        name: RegisteredRollup(name, fp, retired, parse_stored_text(stored, orjson.loads(d)["granularity"]))
        for name, fp, retired, stored, d in rows.all()
    }


async def _apply(conn: AsyncConnection, plan: RegistryPlan) -> None:
    for spec in plan.add:
        # A table made before the registry existed is adopted as matching its declaration.
        await conn.execute(
            text("INSERT INTO tally_rollups (name, fingerprint, definition, granularities) VALUES (:n, :f, :d, :g)"),
            {
                "n": spec.name,
                "f": fingerprint(spec),
                "d": orjson.dumps(definition(spec)).decode(),
                "g": stored_text(spec),
            },
        )
    for spec in plan.regranulate:
        await conn.execute(
            text("UPDATE tally_rollups SET granularities = :g WHERE name = :n"),
            {"n": spec.name, "g": stored_text(spec)},
        )
    if plan.dropped:
        log.warning("no longer stored: %s (tables kept, no longer written)", ", ".join(plan.dropped))
    if plan.fill:
        # Before the fills read a base table: see the module's docstring.
        await conn.execute(text("LOCK TABLE tally_offsets IN SHARE MODE"))
        for spec, granularities in plan.fill:
            await fill_coarse_tables(conn, spec, granularities)
            log.info("filled %s from %s", ", ".join(spec.table_for(g) for g in granularities), spec.table)
    if plan.revive:
        await conn.execute(text("UPDATE tally_rollups SET retired_at = NULL WHERE name = ANY(:n)"), {"n": plan.revive})
    if plan.retire:
        await conn.execute(text("UPDATE tally_rollups SET retired_at = now() WHERE name = ANY(:n)"), {"n": plan.retire})
        log.warning("retired rollup(s) %s: tables kept, no longer applied", ", ".join(plan.retire))
    # Any change to the applied set fences consumers started with another rollups file.
    await conn.execute(
        text(
            "INSERT INTO tally_meta (key, value) VALUES ('rollups_version', 1) "
            "ON CONFLICT (key) DO UPDATE SET value = tally_meta.value + CAST(:bump AS bigint)"
        ),
        {"bump": 1 if plan.changed else 0},
    )


async def migrate(settings: Settings) -> None:
    settings.require("kafka_bootstrap", "postgres_url")
    await ensure_topics(settings)
    await migrate_database(settings)
