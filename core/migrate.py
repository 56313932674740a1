"""`tally migrate`: create the topics, the offsets table and every declared rollup table.

Idempotent: tables and indexes that exist are kept, new rollups are added. A
Postgres advisory lock keeps concurrent migrations from racing.
"""

from __future__ import annotations

import logging

from sqlalchemy import text

from core.db import write_engine
from core.kafka import ensure_topics
from core.settings import Settings
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
            await conn.run_sync(metadata.create_all)
            # create_all adds indexes only to new tables; add any declared since.
            for table in metadata.sorted_tables:
                for index in table.indexes:
                    await conn.run_sync(index.create, checkfirst=True)
    finally:
        await engine.dispose()
    log.info("database ready: %s", ", ".join(s.table for s in settings.rollups))


async def migrate(settings: Settings) -> None:
    settings.require("kafka_bootstrap", "postgres_url")
    await ensure_topics(settings)
    await migrate_database(settings)
