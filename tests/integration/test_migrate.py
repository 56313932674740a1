"""`tally migrate` creates topics, the offsets table and rollup tables with their indexes."""

from __future__ import annotations

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from core.migrate import migrate
from core.settings import Settings

pytestmark = pytest.mark.integration


async def test_migrate_creates_tables_indexes_and_topics(settings: Settings) -> None:
    await migrate(settings)
    await migrate(settings)  # idempotent

    conn = await asyncpg.connect(settings.postgres_url)
    try:
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        assert tables == {"tally_offsets", "tally_api_keys", "agg_events_by_type", "agg_page_views"}
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
