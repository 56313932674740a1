"""Response and error models shared by the HTTP services (and their OpenAPI schemas)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Problem(BaseModel):
    """RFC 9457 problem details, served as application/problem+json."""

    type: str = Field("about:blank", examples=["https://tally.dev/problems/invalid-events"])
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[dict[str, Any]] | None = Field(None, description="Per-item errors, e.g. rejected events by index.")


class RejectedEvent(BaseModel):
    index: int = Field(description="Position of the event in the batch, from 0.")
    error: str


class IngestAccepted(BaseModel):
    accepted: int = Field(description="Events durable in Kafka.")
    rejected: list[RejectedEvent] = Field(default_factory=list)


class DimensionInfo(BaseModel):
    name: str
    path: str


class MeasureInfo(BaseModel):
    name: str
    op: str
    path: str | None
    merge: str = Field(description="How the measure merges across buckets: sum, min, max or union (a sketch).")
    precision: int | None = Field(
        default=None, description="A sketch's precision: lg_k of a `uniq` HLL, k of a `quantiles` KLL."
    )


class RollupInfo(BaseModel):
    name: str
    table: str
    granularity: str = Field(description="The base table's bucket: the finest a query may ask for.")
    stored_granularities: list[str] = Field(
        default_factory=list,
        description=(
            "Granularities stored as tables, ascending, the base one first; a query reads the coarsest "
            "that serves it exactly (`meta.table`)."
        ),
        examples=[["minute", "hour", "day"]],
    )
    tables: dict[str, str] = Field(
        default_factory=dict,
        description="The table of each stored granularity.",
        examples=[{"minute": "agg_events_by_type", "hour": "agg_events_by_type__hour"}],
    )
    granularities: list[str] = Field(description="Granularities this rollup can be queried at.")
    dimensions: list[DimensionInfo]
    measures: list[MeasureInfo]
    fields: list[str] = Field(
        default_factory=list,
        description=(
            "The measure fields a query may name: stored measures, `uniq_<col>` distinct counts, p50/p95/p99 "
            "of each `quantiles` measure (any `p<1-99>_<col>` and `p999_<col>` may be asked for), and "
            "`avg_<col>` (sum/count) where the rollup counts and sums. Without `fields`, all but the averages."
        ),
        examples=[["count", "sum_properties_amount", "uniq_user_id", "p50_properties_amount"]],
    )
    where: dict[str, list[str]]
    filterable: list[str] = Field(
        description="Columns `filter[...]` accepts: dimensions (one of values) and measures (bounds)."
    )
    retention: str | None = Field(
        default=None,
        description=(
            "How long buckets are kept, as declared in the rollups file (`90d`, `36h`); null: forever. "
            "Older buckets are deleted (`tally retention`, or the consumers every TALLY_RETENTION_INTERVAL_SECONDS), "
            "and events that arrive for them are not counted."
        ),
        examples=["90d"],
    )


class RollupList(BaseModel):
    data: list[RollupInfo]


class QueryMeta(BaseModel):
    rollup: str
    granularity: str
    tz: str = Field(description="Time zone of day, week and month buckets (`tz`).")
    from_: str = Field(alias="from", description="Aligned start (inclusive), UTC.")
    to: str = Field(description="Aligned end (exclusive), UTC.")
    fields: list[str]
    filters: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Applied filters: dimension values sorted and de-duplicated; measure bounds as `op:number`.",
    )
    order: list[str] = Field(description="The total order used, tie-breakers included.")
    limit: int
    offset: int | None = None
    rows: int = Field(description="Rows in this page.")
    rows_read: int = Field(description="Stored rollup rows merged into this page's rows.")
    table: str | None = Field(
        default=None,
        description=(
            "The stored table that answered: the coarsest whose buckets merge exactly into the asked ones "
            "in `tz` and tile the range (a 90-day hourly query reads the hour table, not minutes)."
        ),
        examples=["agg_events_by_type__hour"],
    )
    table_granularity: str | None = Field(default=None, description="The bucket size of `table`.")
    total: int | None = Field(default=None, description="Rows the whole query matches (`total=true` only).")
    query_ms: float = Field(description="Postgres time when this answer was computed (a hit keeps the original).")
    cache: Literal["hit", "stale", "miss", "bypass"] = Field(description="How this response was obtained.")
    age: int = Field(description="Seconds since this answer was computed.")
    elapsed_ms: float = Field(description="Time this request took in the query service.")


class QueryResult(BaseModel):
    data: list[dict[str, Any]] | dict[str, list[Any]]
    next_cursor: str | None
    meta: QueryMeta


LagStatus = Literal["OK", "WARN", "STALL", "STOP", "UNKNOWN"]
_STATUS_DOC = (
    "Verdict over the sliding window (README, Lag verdicts): OK; WARN the lag grew in every interval; "
    "STALL the stored offset did not move across the window while records wait; STOP nothing applied for "
    "longer than the window while records wait; UNKNOWN nothing observed yet."
)


class PartitionLag(BaseModel):
    partition: int
    end_offset: int
    stored_offset: int | None
    lag_records: int
    lag_seconds: float
    idle_seconds: float | None = Field(
        default=None, description="Seconds since the stored offset last moved (null when none is stored)."
    )
    status: LagStatus = Field(default="UNKNOWN", description=_STATUS_DOC)


class LagWindow(BaseModel):
    samples: int = Field(description="Observations kept per partition (TALLY_LAG_WINDOW_SAMPLES).")
    sample_seconds: float = Field(description="Seconds between observations (TALLY_LAG_SAMPLE_SECONDS).")
    seconds: float = Field(description="The window's length: samples x sample_seconds; STOP is idle for longer.")
    observations: int = Field(description="Observations held now for the partition with the fewest.")


class LagReport(BaseModel):
    group: str
    topic: str
    partitions: list[PartitionLag]
    total_lag_records: int
    max_lag_seconds: float
    status: LagStatus = Field(default="UNKNOWN", description="The worst partition's verdict.")
    window: LagWindow | None = None


class CounterSource(BaseModel):
    name: str = Field(description="The target's name in TALLY_METRICS_TARGETS (`name=url`).")
    up: bool = Field(description="Whether its /metrics answered within the scrape timeout.")
    error: str | None = Field(default=None, description="Why not, when it did not (no address is shown).")
    counters: dict[str, float] = Field(
        default_factory=dict, description="Each counter of `ServiceCounters.names`, summed over its labels."
    )


class ServiceCounters(BaseModel):
    at: float = Field(description="Unix time of the scrape: two answers give rates.")
    names: list[str] = Field(description="The counters scraped, in display order.")
    sources: list[CounterSource] = Field(description="One entry per metrics target, in configured order.")
