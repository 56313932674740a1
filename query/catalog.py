"""The rollups this process serves: specs, their SQLAlchemy tables and their public description. Pure.

Built once per app from the settings' rollups file, so each query looks its
rollup up in a dict instead of rebuilding table metadata.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sqlalchemy import MetaData, Table

from core.problems import NotFound
from query.params import RollupQuery
from query.planner import stored_granularity
from schemas.api import DimensionInfo, MeasureInfo, RollupInfo, RollupList
from schemas.rollups import GRANULARITIES, RollupSpec, granularity_rank
from schemas.tables import rollup_table

MERGE = {"count": "sum", "sum": "sum", "min": "min", "max": "max", "uniq": "union", "quantiles": "union"}


@dataclass(frozen=True, slots=True)
class Source:
    """The stored table that answers a query, and the size of its buckets."""

    granularity: str
    table: Table


@dataclass(frozen=True, slots=True)
class Rollup:
    spec: RollupSpec
    table: Table  # the base table, at spec.granularity
    tables: Mapping[str, Table]  # every stored granularity (the base one included) -> its table

    def source(self, q: RollupQuery) -> Source:
        """The coarsest stored table that serves `q` exactly (see planner.stored_granularity)."""
        granularity = stored_granularity(self.spec, q)
        return Source(granularity, self.tables[granularity])

    @property
    def base(self) -> Source:
        return Source(self.spec.granularity, self.table)


def _rollup(spec: RollupSpec, metadata: MetaData) -> Rollup:
    tables: dict[str, Table] = {g: rollup_table(spec, metadata, g) for g in spec.granularities}
    return Rollup(spec, tables[spec.granularity], tables)


class Catalog:
    def __init__(self, specs: Iterable[RollupSpec]) -> None:
        metadata = MetaData()
        self._rollups = {s.name: _rollup(s, metadata) for s in specs}

    def get(self, name: str) -> Rollup:
        try:
            return self._rollups[name]
        except KeyError:
            shown = name if len(name) <= 64 else name[:61] + "..."
            raise NotFound(f"no rollup named {shown!r}; GET /v1/rollups lists them") from None

    def describe(self) -> RollupList:
        return RollupList(data=[describe(r.spec) for r in self._rollups.values()])


def describe(spec: RollupSpec) -> RollupInfo:
    return RollupInfo(
        name=spec.name,
        table=spec.table,
        granularity=spec.granularity,
        stored_granularities=list(spec.granularities),
        tables={g: spec.table_for(g) for g in spec.granularities},
        granularities=[g for g in GRANULARITIES if granularity_rank(g) >= granularity_rank(spec.granularity)],
        dimensions=[DimensionInfo(name=d.column, path=d.path) for d in spec.dimensions],
        measures=[
            MeasureInfo(name=m.column, op=m.op, path=m.path, merge=MERGE[m.op], precision=m.precision)
            for m in spec.measures
        ],
        fields=list(spec.offered_fields),
        where={k: list(v) for k, v in spec.where.items()},
        filterable=[*spec.dimension_columns, *spec.offered_fields],
        retention=spec.retention_text,
    )
