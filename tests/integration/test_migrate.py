"""`tally migrate` creates topics, the offsets table and rollup tables with their indexes."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from core.migrate import migrate
from core.registry import RollupChanged
from core.settings import Settings

pytestmark = pytest.mark.integration


async def test_migrate_creates_tables_indexes_and_topics(settings: Settings) -> None:
    await migrate(settings)
    await migrate(settings)  # idempotent

    conn = await asyncpg.connect(settings.postgres_url)
    try:
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        assert tables == {"tally_offsets", "tally_api_keys", "tally_rollups", "tally_meta", "tally_rollup_starts",
                          "tally_seen_events", "agg_events_by_type", "agg_page_views",
                          "agg_events_by_type__hour", "agg_events_by_type__day",
                          "agg_page_views__hour", "agg_page_views__day"}
        key_cols = {
            r["column_name"]: (r["data_type"], r["is_nullable"])
            for r in await conn.fetch(
                "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                "WHERE table_name='tally_api_keys'"
            )
        }
        assert key_cols == {
            "id": ("text", "NO"),
            "name": ("text", "NO"),
            "secret_hash": ("bytea", "NO"),
            "scopes": ("ARRAY", "NO"),
            "rate_limit": ("integer", "YES"),
            "created_at": ("timestamp with time zone", "NO"),
            "revoked_at": ("timestamp with time zone", "YES"),
        }
        cols = [
            (r["column_name"], r["data_type"])
            for r in await conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name='agg_events_by_type' ORDER BY ordinal_position"
            )
        ]
        assert cols == [
            ("bucket", "timestamp with time zone"),
            ("type", "text"),
            ("source", "text"),
            ("count", "bigint"),
            ("sum_properties_amount", "numeric"),
            ("min_properties_amount", "numeric"),
            ("max_properties_amount", "numeric"),
            ("uniq_user_id", "bytea"),  # DataSketches HLL (schemas.sketches)
            ("quantiles_properties_amount", "bytea"),  # DataSketches KLL
        ]
        indexes = {
            r["indexname"]: r["indexdef"]
            for r in await conn.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE tablename='agg_page_views'")
        }
        assert set(indexes) == {
            "agg_page_views_pkey",
            "ix_agg_page_views_properties_country_bucket",
            "ix_agg_page_views_properties_path_bucket",
        }
        assert "(bucket, properties_country, properties_path)" in indexes["agg_page_views_pkey"]
    finally:
        await conn.close()

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([settings.topic, settings.dlq_topic])
        assert sorted(len(t["partitions"]) for t in described) == [4, 4]
    finally:
        await admin.close()


def _rollups_file(tmp: Path, body: str) -> Path:
    path = tmp / f"rollups-{abs(hash(body))}.toml"
    path.write_text(body)
    return path


BY_TYPE = '[[rollup]]\nname = "by_type"\ndimensions = ["type"]\nmeasures = ["count"]\n'
BY_SOURCE = '[[rollup]]\nname = "by_source"\ndimensions = ["source"]\nmeasures = ["count"]\n'


async def test_the_registry_adds_retires_revives_and_refuses_changes(settings: Settings, tmp_path: Path) -> None:
    async def registry() -> tuple[int, dict[str, bool]]:
        conn = await asyncpg.connect(settings.postgres_url)
        try:
            version = await conn.fetchval("SELECT value FROM tally_meta WHERE key = 'rollups_version'")
            rows = await conn.fetch("SELECT name, retired_at IS NULL AS active FROM tally_rollups")
        finally:
            await conn.close()
        return version, {r["name"]: r["active"] for r in rows}

    def with_file(body: str) -> Settings:
        return settings.model_copy(update={"rollups_file": _rollups_file(tmp_path, body)})

    await migrate(with_file(BY_TYPE))
    assert await registry() == (1, {"by_type": True})
    await migrate(with_file(BY_TYPE))  # nothing changed: the version stays
    assert await registry() == (1, {"by_type": True})
    await migrate(with_file(BY_TYPE + BY_SOURCE))  # added
    assert await registry() == (2, {"by_type": True, "by_source": True})
    await migrate(with_file(BY_SOURCE))  # removed from the file: retired, table kept
    assert await registry() == (3, {"by_type": False, "by_source": True})
    await migrate(with_file(BY_TYPE + BY_SOURCE))  # back again
    assert await registry() == (4, {"by_type": True, "by_source": True})

    changed = BY_TYPE.replace('["type"]', '["type", "source"]') + BY_SOURCE
    refusal = r"by_type changed .* \(e.g. by_type_v2\).*`tally backfill by_type_v2 --from"
    with pytest.raises(RollupChanged, match=refusal):
        await migrate(with_file(changed))
    assert await registry() == (4, {"by_type": True, "by_source": True})  # nothing was touched
