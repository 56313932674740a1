"""`tally migrate`: create the topics, the offsets table and every declared rollup table.

Idempotent: tables and indexes that exist are kept, new rollups are added, removed
ones retired, and a changed definition is refused (see core.registry). A Postgres
advisory lock keeps concurrent migrations from racing.
"""

from __future__ import annotations

import logging

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from core.db import write_engine
from core.kafka import ensure_topics
from core.registry import RegisteredRollup, RegistryPlan, plan_registry
from core.retention import short_retentions
from core.settings import Settings
from schemas.rollups import definition, fingerprint
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
    rows = await conn.execute(text("SELECT name, fingerprint, retired_at IS NOT NULL FROM tally_rollups"))
    return {name: RegisteredRollup(name, fp, retired) for name, fp, retired in rows.all()}


async def _apply(conn: AsyncConnection, plan: RegistryPlan) -> None:
    for spec in plan.add:
        # A table made before the registry existed is adopted as matching its declaration.
        await conn.execute(
            text("INSERT INTO tally_rollups (name, fingerprint, definition) VALUES (:n, :f, :d)"),
            {"n": spec.name, "f": fingerprint(spec), "d": orjson.dumps(definition(spec)).decode()},
        )
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
