"""SQLAlchemy table definitions: the offsets table, API keys and one table per rollup spec."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, UUID

from schemas.rollups import RollupSpec


def offsets_table(metadata: MetaData) -> Table:
    """Consumer positions, advanced in the same transaction as the rollup upserts."""
    return Table(
        "tally_offsets",
        metadata,
        Column("group_id", Text, nullable=False),
        Column("topic", Text, nullable=False),
        Column("partition", Integer, nullable=False),
        Column("next_offset", BigInteger, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        PrimaryKeyConstraint("group_id", "topic", "partition"),
    )


def api_keys_table(metadata: MetaData) -> Table:
    """API keys (`tally_<id>_<secret>`): the public id, and only a SHA-256 hash of the secret.

    SHA-256 and not a password hash (bcrypt, scrypt, argon2): a secret is 32 random
    bytes from `secrets`, not something a person chose, so there is nothing to guess
    from a leaked hash (2^256 candidates) and a slow hash would add no safety; it would
    only cost milliseconds of CPU on every cache miss of the ingest hot path. GitHub
    and others store random tokens the same way. The id is public (it names the key
    in logs and in `tally keys list`); the secret is shown once, at creation.
    """
    return Table(
        "tally_api_keys",
        metadata,
        Column("id", Text, primary_key=True),
        Column("name", Text, nullable=False),
        Column("secret_hash", LargeBinary, nullable=False),
        Column("scopes", ARRAY(Text), nullable=False),
        Column("rate_limit", Integer, nullable=True),  # events/s for ingest; NULL = the configured default
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("revoked_at", DateTime(timezone=True), nullable=True),
        CheckConstraint("rate_limit IS NULL OR rate_limit > 0", name="ck_tally_api_keys_rate_limit"),
    )


def rollup_table(spec: RollupSpec, metadata: MetaData, granularity: str | None = None) -> Table:
    """`agg_<name>(bucket, dims..., measures...)`, keyed by (bucket, dims...); or, given a coarser
    stored granularity, its table `agg_<name>__<granularity>` with the same columns and keys.

    Each dimension also gets a (dimension, bucket) index so that a filter on one
    dimension over a time range is an index scan. Index names carry the table name,
    so a coarse table's do not collide with the base's.
    """
    name = spec.table_for(granularity or spec.granularity)
    columns: list[Column[object]] = [Column("bucket", DateTime(timezone=True), nullable=False)]
    columns += [Column(c, Text, nullable=False, server_default=text("''")) for c in spec.dimension_columns]
    for m in spec.measures:
        if m.op == "count":
            columns.append(Column(m.column, BigInteger, nullable=False))
        elif m.is_sketch:  # schemas.sketches' bytes; NULL: no value seen in the row
            columns.append(Column(m.column, LargeBinary, nullable=True))
        else:
            columns.append(Column(m.column, Numeric, nullable=True))
    table = Table(name, metadata, *columns, PrimaryKeyConstraint(*spec.key_columns))
    for c in spec.dimension_columns:
        Index(f"ix_{name}_{c}_bucket", table.c[c], table.c.bucket)
    return table


def registry_tables(metadata: MetaData) -> None:
    """The rollup registry, its version, and where each rollup started being applied.

    `tally_rollups` holds the definition each table was made for. `tally_meta`'s
    `rollups_version` changes whenever the set of applied rollups does; a consumer's
    offset update requires the version it was started with, so a consumer running
    an older rollups file is fenced instead of silently skipping a new rollup.
    `tally_rollup_starts` is the first offset of each partition a group applied a
    rollup from: the upper bound of what `tally backfill` must fill.
    """
    Table(
        "tally_rollups",
        metadata,
        Column("name", Text, primary_key=True),
        Column("fingerprint", Text, nullable=False),
        Column("definition", Text, nullable=False),
        # The stored granularities (`minute,hour,day`); NULL in rows older than coarse tables: base only.
        Column("granularities", Text, nullable=True),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("retired_at", DateTime(timezone=True), nullable=True),
    )
    Table(
        "tally_meta",
        metadata,
        Column("key", Text, primary_key=True),
        Column("value", BigInteger, nullable=False),
    )
    Table(
        "tally_rollup_starts",
        metadata,
        Column("group_id", Text, nullable=False),
        Column("rollup", Text, nullable=False),
        Column("topic", Text, nullable=False),
        Column("partition", Integer, nullable=False),
        Column("start_offset", BigInteger, nullable=False),
        PrimaryKeyConstraint("group_id", "rollup", "topic", "partition"),
    )


def seen_events_table(metadata: MetaData) -> Table:
    """Event ids already counted, for `TALLY_DEDUP`: one partition per UTC day of claiming.

    Keyed (event_id, day), so a claim's ON CONFLICT meets any other claim of the same
    id on the same day, and a look-up by id probes one index entry per day. Range
    partitioned by day so that expiring the window is `DETACH PARTITION ...
    CONCURRENTLY` plus `DROP TABLE` of a whole day, which neither blocks the
    consumers' claims nor leaves dead tuples for vacuum, where a DELETE by time would
    rewrite every expired id. Partitions are created and dropped by the consumers
    (consumers.dedup_store, which also explains why claims are exact); `tally migrate`
    creates only this parent. `seen_at` is for people looking at the table.
    """
    return Table(
        "tally_seen_events",
        metadata,
        Column("event_id", UUID(as_uuid=False), nullable=False),
        Column("seen_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("day", Date, nullable=False),
        PrimaryKeyConstraint("event_id", "day"),
        postgresql_partition_by="RANGE (day)",
    )


def build_metadata(specs: Iterable[RollupSpec]) -> MetaData:
    metadata = MetaData()
    offsets_table(metadata)
    api_keys_table(metadata)
    registry_tables(metadata)
    seen_events_table(metadata)
    for spec in specs:
        for granularity in spec.granularities:
            rollup_table(spec, metadata, granularity)
    return metadata
