"""SQLAlchemy table definitions: the offsets table and one table per rollup spec."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    Table,
    Text,
    func,
    text,
)

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


def rollup_table(spec: RollupSpec, metadata: MetaData) -> Table:
    """`agg_<name>(bucket, dims..., measures...)`, keyed by (bucket, dims...).

    Each dimension also gets a (dimension, bucket) index so that a filter on one
    dimension over a time range is an index scan.
    """
    columns: list[Column[object]] = [Column("bucket", DateTime(timezone=True), nullable=False)]
    columns += [Column(c, Text, nullable=False, server_default=text("''")) for c in spec.dimension_columns]
    for m in spec.measures:
        if m.op == "count":
            columns.append(Column(m.column, BigInteger, nullable=False))
        else:
            columns.append(Column(m.column, Numeric, nullable=True))
    table = Table(spec.table, metadata, *columns, PrimaryKeyConstraint(*spec.key_columns))
    for c in spec.dimension_columns:
        Index(f"ix_{spec.table}_{c}_bucket", table.c[c], table.c.bucket)
    return table


def build_metadata(specs: Iterable[RollupSpec]) -> MetaData:
    metadata = MetaData()
    offsets_table(metadata)
    for spec in specs:
        rollup_table(spec, metadata)
    return metadata
