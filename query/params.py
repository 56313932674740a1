"""Parse and validate a rollup query's parameters into a normalized `RollupQuery`. Pure.

Every identifier (field, filter dimension, order column, granularity) is checked
against the rollup spec here, so nothing a client typed reaches SQL except as a
bound value. Errors are 400s that name the offending parameter or column.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Literal
from zoneinfo import ZoneInfo

import orjson

from core.problems import BadRequest
from query.timerange import (
    TimeExpr,
    TimeRange,
    align,
    format_instant,
    nests,
    parse_time,
    parse_zone,
)
from schemas.rollups import GRANULARITIES, RollupSpec, dimension_text, granularity_rank

Format = Literal["json", "columns", "csv"]
FORMATS: tuple[Format, ...] = ("json", "columns", "csv")
PARAMETERS = (
    "from",
    "to",
    "granularity",
    "tz",
    "fields",
    "filter[<column>]",
    "order",
    "limit",
    "cursor",
    "offset",
    "format",
    "total",
)
_SINGLE = frozenset(p for p in PARAMETERS if not p.startswith("filter"))
_FILTER = re.compile(r"^filter\[(.*)\]$", re.DOTALL)
_UINT = re.compile(r"^[0-9]{1,12}$")
_BOUND = re.compile(r"^(gt|gte|lt|lte|eq):(-?[0-9]{1,30}(?:\.[0-9]{1,30})?)$")
_COMPARE = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "eq": "="}
_BOOL = {"true": True, "false": False, "1": True, "0": False}
DEFAULT_FROM = "-24h"
DEFAULT_TO = "now"
MAX_CURSOR_CHARS = 4_096


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds from settings, passed in so this module stays free of configuration I/O."""

    default_limit: int
    max_limit: int
    max_offset: int
    max_buckets: int = 100_000
    max_export_rows: int = 1_000_000
    max_filter_values: int = 1_000


@dataclass(frozen=True, slots=True)
class OrderItem:
    column: str
    descending: bool = False

    @property
    def spelled(self) -> str:
        return f"-{self.column}" if self.descending else self.column


@dataclass(frozen=True, slots=True)
class Bound:
    """One side of a range filter on a merged measure: `op` is a key of `COMPARISONS`."""

    op: str
    value: Decimal

    @property
    def spelled(self) -> str:
        return f"{self.op}:{self.value}"


COMPARISONS = tuple(_COMPARE)


@dataclass(frozen=True, slots=True)
class RollupQuery:
    """A validated query. `order` is total: the group columns are appended as tie-breakers."""

    rollup: str
    granularity: str
    from_expr: TimeExpr
    to_expr: TimeExpr
    range: TimeRange
    fields: tuple[str, ...]
    group: tuple[str, ...]
    measures: tuple[str, ...]
    filters: tuple[tuple[str, tuple[str, ...]], ...]
    bounds: tuple[tuple[str, tuple[Bound, ...]], ...]
    order: tuple[OrderItem, ...]
    limit: int
    offset: int
    cursor: str | None
    format: Format
    zone: str = "UTC"
    total: bool = False
    export: bool = False
    # Ordered or filtered by a sketch field (uniq_*, p<NN>_*), which SQL cannot compute: the groups
    # are ranked, filtered and paged in Python (query.derived), with the same semantics as SQL's.
    in_python: bool = False

    def _time_key(self, expr: TimeExpr, aligned: datetime) -> str:
        return expr.canonical if expr.relative else format_instant(aligned)

    def fingerprint(self) -> str:
        """Identity of the result *sequence* a cursor walks: not page size, format or position.

        Relative times are kept as written (`now-86400s`) because the cursor pins the
        aligned range of the first page, so later pages do not slide with the clock.
        """
        ident = [
            self.rollup,
            self.granularity,
            self._time_key(self.from_expr, self.range.start),
            self._time_key(self.to_expr, self.range.end),
            self.zone,
            list(self.fields),
            [[d, list(v)] for d, v in self.filters],
            self._bounds_key(),
            [o.spelled for o in self.order],
        ]
        return hashlib.sha256(orjson.dumps(ident)).hexdigest()[:32]

    def identity(self) -> bytes:
        """Everything that changes the response bytes: the basis of the cache key."""
        return orjson.dumps(
            [
                self.rollup,
                self.granularity,
                format_instant(self.range.start),
                format_instant(self.range.end),
                self.zone,
                list(self.fields),
                [[d, list(v)] for d, v in self.filters],
                self._bounds_key(),
                [o.spelled for o in self.order],
                self.limit,
                self.offset,
                self.cursor,
                self.format,
                self.total,
            ]
        )

    def _bounds_key(self) -> list[list[object]]:
        return [[m, [b.spelled for b in bs]] for m, bs in self.bounds]

    @property
    def tzinfo(self) -> tzinfo:
        return ZoneInfo(self.zone)

    @property
    def computed_measures(self) -> tuple[str, ...]:
        """Selected measures, then those only filtered on: the grouped query must merge both."""
        return tuple(dict.fromkeys((*self.measures, *(m for m, _ in self.bounds))))

    def with_range(self, range_: TimeRange) -> RollupQuery:
        return dataclasses.replace(self, range=range_)

    @property
    def filter_map(self) -> dict[str, list[str]]:
        return {d: list(v) for d, v in self.filters}


def _show(names: Iterable[str]) -> str:
    return ", ".join(repr(n if len(n) <= 64 else n[:61] + "...") for n in names)


def _split(name: str, value: str) -> list[str]:
    items = [v.strip() for v in value.split(",")]
    if any(not v for v in items):
        raise BadRequest(f"'{name}' has an empty item: {value!r}")
    return items


def _uint(name: str, value: str, lo: int, hi: int) -> int:
    if not _UINT.match(value.strip()) or not lo <= int(value) <= hi:
        raise BadRequest(f"'{name}' must be an integer from {lo} to {hi}, got {value[:32]!r}")
    return int(value)


def _collect(items: Iterable[tuple[str, str]]) -> tuple[dict[str, str], dict[str, list[str]]]:
    singles: dict[str, str] = {}
    filters: dict[str, list[str]] = {}
    unknown: list[str] = []
    repeated: list[str] = []
    for key, value in items:
        match = _FILTER.match(key)
        if match:
            # An empty value is the empty string: the stored value of a missing dimension.
            filters.setdefault(match.group(1), []).extend(value.split(","))
        elif key in _SINGLE:
            if key in singles:
                repeated.append(key)
            singles[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise BadRequest(f"unknown query parameter(s): {_show(unknown)}; allowed: {', '.join(PARAMETERS)}")
    if repeated:
        raise BadRequest(f"query parameter(s) given more than once: {_show(dict.fromkeys(repeated))}")
    return singles, filters


def _granularity(spec: RollupSpec, value: str | None) -> str:
    if value is None:
        return spec.granularity
    if value not in GRANULARITIES:
        raise BadRequest(f"unknown granularity {value[:32]!r}; one of {', '.join(GRANULARITIES)}")
    if granularity_rank(value) < granularity_rank(spec.granularity):
        raise BadRequest(f"granularity {value!r} is finer than rollup {spec.name!r} stores ({spec.granularity})")
    return value


def _is_measure(spec: RollupSpec, name: str) -> bool:
    return spec.field(name) is not None


def _measure_hint(spec: RollupSpec) -> str:
    """The measure fields, and the pattern of the percentile ones when the rollup has quantiles."""
    shown = ", ".join(f for f in spec.offered_fields if spec.field(f).kind != "percentile")  # type: ignore[union-attr]
    columns = [c.removeprefix("quantiles_") for c in spec.sketch_columns if c.startswith("quantiles_")]
    percentiles = ", ".join(f"p<1-99|999>_{c}" for c in columns)
    return ", ".join(x for x in (shown, percentiles) if x)


def _fields(spec: RollupSpec, value: str | None) -> tuple[str, ...]:
    if value is None:
        return ("bucket", *spec.dimension_columns, *spec.measure_fields)
    requested = _split("fields", value)
    unknown = [f for f in requested if f != "bucket" and f not in spec.dimension_columns and not _is_measure(spec, f)]
    if unknown:
        available = ", ".join(("bucket", *spec.dimension_columns, _measure_hint(spec)))
        raise BadRequest(f"unknown field(s): {_show(unknown)}; available: {available}")
    return tuple(dict.fromkeys(requested))


def _filters(
    spec: RollupSpec, raw: dict[str, list[str]], limits: Limits
) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], tuple[tuple[str, tuple[Bound, ...]], ...]]:
    """`filter[dimension]=a,b` (one of the values) and `filter[measure]=gte:10,lt:20` (a range)."""
    unknown = [c for c in raw if c not in spec.dimension_columns and not _is_measure(spec, c)]
    if unknown:
        raise BadRequest(
            f"unknown filter column(s): {_show(unknown)}; dimensions: {', '.join(spec.dimension_columns) or '-'}; "
            f"measures: {_measure_hint(spec)}"
        )
    dimensions, measures = [], []
    for column in sorted(raw):
        if column not in spec.dimension_columns:
            measures.append((column, _bounds(column, raw[column])))
            continue
        # Compared as the consumers store them: NUL (which Postgres text cannot hold) as U+FFFD.
        values = tuple(sorted({dimension_text(v) for v in raw[column]}))
        if len(values) > limits.max_filter_values:
            raise BadRequest(f"filter[{column}] has more than {limits.max_filter_values} values")
        dimensions.append((column, values))
    return tuple(dimensions), tuple(measures)


def _bounds(measure: str, items: list[str]) -> tuple[Bound, ...]:
    bounds: dict[str, Bound] = {}
    for item in items:
        match = _BOUND.match(item.strip())
        if not match:
            raise BadRequest(
                f"filter[{measure}] item {item[:40]!r} is not a bound: use op:number with op one of "
                f"{', '.join(COMPARISONS)} (e.g. filter[{measure}]=gte:10,lt:20)"
            )
        op, number = match.groups()
        if op in bounds:
            raise BadRequest(f"filter[{measure}] gives {op!r} more than once")
        try:
            bounds[op] = Bound(op, Decimal(number))
        except InvalidOperation:  # pragma: no cover - the pattern admits only plain decimals
            raise BadRequest(f"filter[{measure}] has a malformed number {number!r}") from None
    return tuple(bounds[op] for op in sorted(bounds))


def _order(
    spec: RollupSpec, value: str | None, fields: tuple[str, ...], group: tuple[str, ...]
) -> tuple[OrderItem, ...]:
    items: list[OrderItem] = []
    if value is not None:
        unknown: list[str] = []
        unselected: list[str] = []
        for raw in _split("order", value):
            # `+col` arrives as ` col` when the client does not percent-encode the plus.
            descending = raw.startswith("-")
            column = raw[1:] if raw[:1] in "-+" else raw
            if column != "bucket" and column not in spec.dimension_columns and not _is_measure(spec, column):
                unknown.append(raw)
            elif column not in fields:
                unselected.append(column)
            else:
                items.append(OrderItem(column, descending))
        if unknown:
            raise BadRequest(f"unknown order column(s): {_show(unknown)}; order by one of the selected fields")
        if unselected:
            raise BadRequest(f"order column(s) {_show(unselected)} not in fields: add them to 'fields' first")
        columns = [i.column for i in items]
        duplicates = sorted({c for c in columns if columns.count(c) > 1})
        if duplicates:
            raise BadRequest(f"order names a column more than once: {_show(duplicates)}")
    ordered = {i.column for i in items}
    # The group key is unique per row, so appending it makes the order total (keyset-safe).
    return (*items, *(OrderItem(c) for c in group if c not in ordered))


def _sketch(spec: RollupSpec, name: str) -> bool:
    field = spec.field(name)
    return field is not None and field.sketch


def _flag(name: str, value: str | None) -> bool:
    if value is None:
        return False
    if value.lower() not in _BOOL:
        raise BadRequest(f"'{name}' must be true or false, got {value[:16]!r}")
    return _BOOL[value.lower()]


def _check_range(spec: RollupSpec, q: RollupQuery, limits: Limits) -> None:
    """Refuse ranges too large to group by bucket, and zones the table's buckets cannot serve exactly."""
    if "bucket" in q.group:
        buckets = q.range.buckets(q.granularity)
        if buckets > limits.max_buckets:
            coarser = [g for g in GRANULARITIES if granularity_rank(g) > granularity_rank(q.granularity)]
            hint = f"a coarser granularity ({', '.join(coarser)}), " if coarser else ""
            raise BadRequest(
                f"the range {format_instant(q.range.start)} to {format_instant(q.range.end)} spans about "
                f"{buckets:,} {q.granularity} buckets, more than the {limits.max_buckets:,} a query may group "
                f"(TALLY_MAX_BUCKETS); use {hint}a shorter range, or leave 'bucket' out of 'fields' for totals"
            )
    if not nests(spec.granularity, q.granularity, q.tzinfo, q.range):
        raise BadRequest(
            f"rollup {spec.name!r} stores {spec.granularity} buckets, which cannot be merged exactly into "
            f"{q.granularity}s of time zone {q.zone!r} (its UTC offset is not a whole {spec.granularity}); "
            "use tz=UTC or a rollup with finer buckets"
        )


def parse_query(spec: RollupSpec, items: Iterable[tuple[str, str]], limits: Limits, now: datetime) -> RollupQuery:
    """Validate raw `(name, value)` query pairs against `spec`; `now` anchors relative times."""
    singles, raw_filters = _collect(items)
    granularity = _granularity(spec, singles.get("granularity"))
    zone = parse_zone(singles["tz"]) if "tz" in singles else None
    fields = _fields(spec, singles.get("fields"))
    # Group key: bucket first (when selected), then dimensions in the order the client listed them.
    group = (*(("bucket",) if "bucket" in fields else ()), *(f for f in fields if f in spec.dimension_columns))
    measures = tuple(f for f in fields if _is_measure(spec, f))
    filters, bounds = _filters(spec, raw_filters, limits)
    order = _order(spec, singles.get("order"), fields, group)
    fmt = singles.get("format", "json")
    if fmt not in FORMATS:
        raise BadRequest(f"unknown format {fmt[:32]!r}; one of {', '.join(FORMATS)}")
    # CSV may ask for more than a page: such an export is streamed instead of cached.
    max_limit = max(limits.max_limit, limits.max_export_rows) if fmt == "csv" else limits.max_limit
    limit = _uint("limit", singles["limit"], 1, max_limit) if "limit" in singles else limits.default_limit
    offset = _uint("offset", singles["offset"], 0, limits.max_offset) if "offset" in singles else 0
    cursor = singles.get("cursor")
    if cursor is not None:
        if "offset" in singles:
            raise BadRequest("'cursor' and 'offset' cannot be combined: use one way of paging")
        if not cursor or len(cursor) > MAX_CURSOR_CHARS:
            raise BadRequest("'cursor' is empty or too long")
    local = zone or ZoneInfo("UTC")
    from_expr = parse_time("from", singles.get("from", DEFAULT_FROM), local)
    to_expr = parse_time("to", singles.get("to", DEFAULT_TO), local)
    q = RollupQuery(
        rollup=spec.name,
        granularity=granularity,
        from_expr=from_expr,
        to_expr=to_expr,
        range=align(from_expr, to_expr, granularity, now, local),
        fields=fields,
        group=group,
        measures=measures,
        filters=filters,
        bounds=bounds,
        order=order,
        limit=limit,
        offset=offset,
        cursor=cursor,
        format=fmt,
        zone=zone.key if zone else "UTC",
        total=_flag("total", singles.get("total")),
        export=limit > limits.max_limit,
        in_python=any(_sketch(spec, c) for c in (*(o.column for o in order), *(m for m, _ in bounds))),
    )
    _check_range(spec, q, limits)
    return q
