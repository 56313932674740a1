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
from datetime import datetime
from typing import Literal

import orjson

from core.problems import BadRequest
from query.timerange import TimeExpr, TimeRange, align, format_instant, parse_time
from schemas.rollups import GRANULARITIES, RollupSpec, granularity_rank

Format = Literal["json", "columns", "csv"]
FORMATS: tuple[Format, ...] = ("json", "columns", "csv")
PARAMETERS = (
    "from",
    "to",
    "granularity",
    "fields",
    "filter[<dimension>]",
    "order",
    "limit",
    "cursor",
    "offset",
    "format",
)
_SINGLE = frozenset(p for p in PARAMETERS if not p.startswith("filter"))
_FILTER = re.compile(r"^filter\[(.*)\]$", re.DOTALL)
_UINT = re.compile(r"^[0-9]{1,12}$")
DEFAULT_FROM = "-24h"
DEFAULT_TO = "now"
MAX_CURSOR_CHARS = 4_096


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds from settings, passed in so this module stays free of configuration I/O."""

    default_limit: int
    max_limit: int
    max_offset: int
    max_filter_values: int = 1_000


@dataclass(frozen=True, slots=True)
class OrderItem:
    column: str
    descending: bool = False

    @property
    def spelled(self) -> str:
        return f"-{self.column}" if self.descending else self.column


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
    order: tuple[OrderItem, ...]
    limit: int
    offset: int
    cursor: str | None
    format: Format

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
            list(self.fields),
            [[d, list(v)] for d, v in self.filters],
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
                list(self.fields),
                [[d, list(v)] for d, v in self.filters],
                [o.spelled for o in self.order],
                self.limit,
                self.offset,
                self.cursor,
                self.format,
            ]
        )

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


def _fields(spec: RollupSpec, value: str | None) -> tuple[str, ...]:
    available = ("bucket", *spec.dimension_columns, *spec.measure_columns)
    if value is None:
        return available
    requested = _split("fields", value)
    unknown = [f for f in requested if f not in available]
    if unknown:
        raise BadRequest(f"unknown field(s): {_show(unknown)}; available: {', '.join(available)}")
    return tuple(dict.fromkeys(requested))


def _filters(spec: RollupSpec, raw: dict[str, list[str]], limits: Limits) -> tuple[tuple[str, tuple[str, ...]], ...]:
    unknown = [d for d in raw if d not in spec.dimension_columns]
    if unknown:
        raise BadRequest(
            f"unknown filter dimension(s): {_show(unknown)}; filterable: {', '.join(spec.dimension_columns) or '-'}"
        )
    out = []
    for dim in sorted(raw):
        values = tuple(sorted(set(raw[dim])))
        if len(values) > limits.max_filter_values:
            raise BadRequest(f"filter[{dim}] has more than {limits.max_filter_values} values")
        out.append((dim, values))
    return tuple(out)


def _order(
    spec: RollupSpec, value: str | None, fields: tuple[str, ...], group: tuple[str, ...]
) -> tuple[OrderItem, ...]:
    items: list[OrderItem] = []
    if value is not None:
        known = ("bucket", *spec.dimension_columns, *spec.measure_columns)
        unknown: list[str] = []
        unselected: list[str] = []
        for raw in _split("order", value):
            # `+col` arrives as ` col` when the client does not percent-encode the plus.
            descending = raw.startswith("-")
            column = raw[1:] if raw[:1] in "-+" else raw
            if column not in known:
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


def parse_query(spec: RollupSpec, items: Iterable[tuple[str, str]], limits: Limits, now: datetime) -> RollupQuery:
    """Validate raw `(name, value)` query pairs against `spec`; `now` anchors relative times."""
    singles, raw_filters = _collect(items)
    granularity = _granularity(spec, singles.get("granularity"))
    fields = _fields(spec, singles.get("fields"))
    # Group key: bucket first (when selected), then dimensions in the order the client listed them.
    group = (*(("bucket",) if "bucket" in fields else ()), *(f for f in fields if f in spec.dimension_columns))
    measures = tuple(f for f in fields if f in spec.measure_columns)
    filters = _filters(spec, raw_filters, limits)
    order = _order(spec, singles.get("order"), fields, group)
    limit = _uint("limit", singles["limit"], 1, limits.max_limit) if "limit" in singles else limits.default_limit
    offset = _uint("offset", singles["offset"], 0, limits.max_offset) if "offset" in singles else 0
    cursor = singles.get("cursor")
    if cursor is not None:
        if "offset" in singles:
            raise BadRequest("'cursor' and 'offset' cannot be combined: use one way of paging")
        if not cursor or len(cursor) > MAX_CURSOR_CHARS:
            raise BadRequest("'cursor' is empty or too long")
    fmt = singles.get("format", "json")
    if fmt not in FORMATS:
        raise BadRequest(f"unknown format {fmt[:32]!r}; one of {', '.join(FORMATS)}")
    from_expr = parse_time("from", singles.get("from", DEFAULT_FROM))
    to_expr = parse_time("to", singles.get("to", DEFAULT_TO))
    return RollupQuery(
        rollup=spec.name,
        granularity=granularity,
        from_expr=from_expr,
        to_expr=to_expr,
        range=align(from_expr, to_expr, granularity, now),
        fields=fields,
        group=group,
        measures=measures,
        filters=filters,
        order=order,
        limit=limit,
        offset=offset,
        cursor=cursor,
        format=fmt,
    )
