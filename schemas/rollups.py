"""Rollups are declared in TOML, not coded: this module turns a declaration into a spec.

A spec fixes the table name, the column names the query API exposes, and how each
measure merges. Everything here is pure so that the consumer, the query planner
and migrations agree on one definition.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, cast

import orjson

Granularity = Literal["minute", "hour", "day", "week", "month"]
GRANULARITIES: tuple[Granularity, ...] = ("minute", "hour", "day", "week", "month")
# Tables may only be stored at fixed-width buckets; week and month are query-time only.
TABLE_GRANULARITIES: tuple[Granularity, ...] = ("minute", "hour", "day")
GRANULARITY_MS: dict[str, int] = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000}

MeasureOp = Literal["count", "sum", "min", "max", "uniq", "quantiles"]
SKETCH_OPS: frozenset[str] = frozenset({"uniq", "quantiles"})
# The quantile fields every `quantiles:<path>` offers when `fields` names none: p50, p95, p99.
DEFAULT_PERCENTILES = ("p50", "p95", "p99")
_PERCENTILE = re.compile(r"^p([1-9][0-9]?|999)_(.+)$")
TOP_LEVEL_FIELDS = ("type", "source", "user_id", "session_id")

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")
_RETENTION = re.compile(r"^([1-9][0-9]{0,5})([hd])$")
_RETENTION_UNITS = {"h": timedelta(hours=1), "d": timedelta(days=1)}
_PATH_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")


class RollupSpecError(ValueError):
    """A rollups file that cannot be used as written."""


def dimension_text(value: Any) -> str:
    """The text a dimension or `where` value is stored and compared as.

    Missing is '' (so it can be part of the primary key), strings as they are
    (NUL, which Postgres text cannot hold, becomes U+FFFD), booleans true/false,
    anything else compact JSON.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if value is True:
        return "true"
    if value is False:
        return "false"
    try:
        return orjson.dumps(value).decode()
    except TypeError:  # an integer beyond 64 bits (orjson writes none): the standard library does
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def granularity_rank(g: str) -> int:
    return GRANULARITIES.index(g)


@dataclass(frozen=True, slots=True)
class Dimension:
    """A grouping column taken from a top-level field or a `properties.*` path."""

    path: str

    @property
    def column(self) -> str:
        return self.path.replace(".", "_")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.path.split("."))


@dataclass(frozen=True, slots=True)
class Measure:
    """`count`; `sum|min|max` over a numeric path (merge by addition or min/max); or a sketch
    (schemas.sketches): `uniq` (distinct values, HLL of `precision` = lg_k) or `quantiles`
    (numeric values, KLL of `precision` = k), which merge by union."""

    op: MeasureOp
    path: str | None = None
    precision: int | None = None  # sketches only: lg_k for uniq, k for quantiles

    @property
    def is_sketch(self) -> bool:
        return self.op in SKETCH_OPS

    @property
    def column(self) -> str:
        return "count" if self.op == "count" else f"{self.op}_{self.path_column}"

    @property
    def path_column(self) -> str:
        return (self.path or "").replace(".", "_")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.path.split(".")) if self.path else ()

    @property
    def declaration(self) -> str:
        """As written in rollups.toml; a sketch's precision is part of it when not the default."""
        if self.op == "count":
            return "count"
        text = f"{self.op}:{self.path}"
        if self.precision is not None and self.precision != _DEFAULT_PRECISION.get(self.op):
            text += f":{_PRECISION_KEY[self.op]}={self.precision}"
        return text


@dataclass(frozen=True, slots=True)
class Field:
    """A measure field the query API offers, and where its value comes from.

    `column`: a stored measure as it is (count, sum/min/max, `uniq_<col>`, whose value
    is the distinct-count estimate of the union); `avg`: sum/count at query time;
    `percentile`: the quantile at `rank` of the union of the `quantiles_<col>` sketches.
    `source` names the stored columns it reads.
    """

    name: str
    kind: Literal["column", "avg", "uniq", "percentile"]
    source: tuple[str, ...]
    rank: float = 0.0

    @property
    def sketch(self) -> bool:
        """Computed in Python from sketches, so SQL can neither order nor filter by it."""
        return self.kind in ("uniq", "percentile")


@dataclass(frozen=True, slots=True)
class RollupSpec:
    name: str
    granularity: Granularity
    dimensions: tuple[Dimension, ...]
    measures: tuple[Measure, ...]
    # path -> allowed values; an event is counted only if every path matches one of them.
    where: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # How long buckets are kept; None: forever. Not part of the definition (see `definition`).
    retention: timedelta | None = None
    # Every stored granularity, ascending, the base (`granularity`) first; () means base only.
    # Not part of the definition either: a coarser table is derived from the base table's rows.
    granularities: tuple[Granularity, ...] = ()

    def __post_init__(self) -> None:
        if not self.granularities:
            object.__setattr__(self, "granularities", (self.granularity,))
        ranks = [TABLE_GRANULARITIES.index(g) for g in self.granularities]
        if self.granularities[0] != self.granularity or ranks != sorted(set(ranks)):
            raise RollupSpecError(
                f"rollup {self.name!r}: granularities {list(self.granularities)} must ascend from the base "
                f"{self.granularity!r}, without repeats"
            )

    @property
    def table(self) -> str:
        return f"agg_{self.name}"

    @property
    def coarse_granularities(self) -> tuple[Granularity, ...]:
        """The stored granularities other than the base: each a table derived from the base's rows."""
        return self.granularities[1:]

    def table_for(self, granularity: str) -> str:
        """`agg_<name>` for the base, `agg_<name>__<granularity>` for a coarser stored one."""
        if granularity == self.granularity:
            return self.table
        if granularity not in self.granularities:
            raise KeyError(f"rollup {self.name!r} stores no {granularity!r} table")
        return f"{self.table}__{granularity}"

    @property
    def tables(self) -> tuple[str, ...]:
        """Every table of the rollup, base first, in `granularities` order."""
        return tuple(self.table_for(g) for g in self.granularities)

    @property
    def dimension_columns(self) -> tuple[str, ...]:
        return tuple(d.column for d in self.dimensions)

    @property
    def measure_columns(self) -> tuple[str, ...]:
        return tuple(m.column for m in self.measures)

    @property
    def key_columns(self) -> tuple[str, ...]:
        return ("bucket", *self.dimension_columns)

    @property
    def retention_text(self) -> str | None:
        return None if self.retention is None else format_retention(self.retention)

    def measure(self, column: str) -> Measure:
        for m in self.measures:
            if m.column == column:
                return m
        raise KeyError(column)

    @property
    def measure_fields(self) -> tuple[str, ...]:
        """The measure fields a query returns when `fields` is not given, in declaration order: each
        stored non-sketch measure, `uniq_<col>`, and p50/p95/p99 of each `quantiles` measure."""
        out: list[str] = []
        for m in self.measures:
            if m.op == "quantiles":
                out += [f"{p}_{m.path_column}" for p in DEFAULT_PERCENTILES]
            else:
                out.append(m.column)
        return tuple(out)

    @property
    def offered_fields(self) -> tuple[str, ...]:
        """`measure_fields` and the averages, which a query must name (besides any `p<NN>_<col>`)."""
        return (*self.measure_fields, *self.average_fields)

    @property
    def average_fields(self) -> tuple[str, ...]:
        """`avg_<col>` for each `sum:<path>` of a rollup that also counts."""
        if "count" not in self.measure_columns:
            return ()
        return tuple(f"avg_{m.path_column}" for m in self.measures if m.op == "sum")

    @property
    def sketch_columns(self) -> tuple[str, ...]:
        return tuple(m.column for m in self.measures if m.is_sketch)

    def field(self, name: str) -> Field | None:
        """The measure field `name` (see `Field`), or None if this rollup offers no such field."""
        for m in self.measures:
            if m.column == name and m.op != "quantiles":
                return Field(name, "uniq" if m.op == "uniq" else "column", (name,))
        if name in self.average_fields:
            column = name.removeprefix("avg_")
            return Field(name, "avg", (f"sum_{column}", "count"))
        match = _PERCENTILE.match(name)
        if match and f"quantiles_{match[2]}" in self.sketch_columns:
            digits = match[1]
            rank = 0.999 if digits == "999" else int(digits) / 100
            return Field(name, "percentile", (f"quantiles_{match[2]}",), rank)
        return None


def _check_path(path: object, what: str, rollup: str) -> str:
    if not isinstance(path, str) or not path:
        raise RollupSpecError(f"rollup {rollup!r}: {what} must be a non-empty string")
    parts = path.split(".")
    if parts[0] == "properties":
        ok = len(parts) >= 2 and all(_PATH_PART.match(p) for p in parts[1:])
    else:
        ok = len(parts) == 1 and parts[0] in TOP_LEVEL_FIELDS
    if not ok:
        raise RollupSpecError(
            f"rollup {rollup!r}: {what} {path!r} must be one of {', '.join(TOP_LEVEL_FIELDS)} "
            "or properties.<key>[.<key>...]"
        )
    return path


# Sketch precision: HLL lg_k (4-21) and KLL k (8-65535), as DataSketches accepts them. The defaults
# meet 1.48 % relative error and 0.68 % rank error at 99 % confidence (schemas.sketches).
DEFAULT_LG_K = 15
DEFAULT_K = 400
_DEFAULT_PRECISION: dict[str, int] = {"uniq": DEFAULT_LG_K, "quantiles": DEFAULT_K}
_PRECISION_KEY = {"uniq": "lg_k", "quantiles": "k"}
_PRECISION_RANGE = {"uniq": (4, 21), "quantiles": (8, 65_535)}


def _parse_measure(decl: object, rollup: str) -> Measure:
    """`"count"`, `"<op>:<path>"`, or a sketch with its precision: `"uniq:user_id:lg_k=16"`,
    `{ uniq = "user_id", lg_k = 16 }`, `{ quantiles = "properties.amount", k = 800 }`."""
    if decl == "count":
        return Measure("count")
    if isinstance(decl, dict):
        decl = _measure_text(decl, rollup)
    if not isinstance(decl, str) or ":" not in decl:
        raise RollupSpecError(f"rollup {rollup!r}: measure {decl!r} must be 'count' or '<op>:<path>'")
    op, path = decl.split(":", 1)
    if op not in ("sum", "min", "max", "uniq", "quantiles"):
        raise RollupSpecError(f"rollup {rollup!r}: measure op {op!r} must be sum, min, max, uniq or quantiles")
    precision = None
    if op in SKETCH_OPS:
        key = _PRECISION_KEY[op]
        path, _, given = path.partition(f":{key}=")
        lo, hi = _PRECISION_RANGE[op]
        if given and (not given.isdigit() or not lo <= int(given) <= hi):
            raise RollupSpecError(f"rollup {rollup!r}: {op} {key} {given!r} must be an integer from {lo} to {hi}")
        precision = int(given) if given else _DEFAULT_PRECISION[op]
    return Measure(op, _check_path(path, "measure path", rollup), precision)  # type: ignore[arg-type]


def _measure_text(decl: dict[str, Any], rollup: str) -> str:
    """`{ uniq = "user_id", lg_k = 16 }` as the string form `uniq:user_id:lg_k=16`."""
    ops = [k for k in decl if k in SKETCH_OPS]
    if len(ops) != 1:
        raise RollupSpecError(f"rollup {rollup!r}: measure table {decl!r} must name one of uniq or quantiles")
    op = ops[0]
    key = _PRECISION_KEY[op]
    extra = sorted(set(decl) - {op, key})
    if extra:
        raise RollupSpecError(f"rollup {rollup!r}: measure table {decl!r} has unknown key(s) {extra}; {op} takes {key}")
    precision = decl.get(key)
    if precision is not None and (type(precision) is not int):
        raise RollupSpecError(f"rollup {rollup!r}: {op} {key} must be an integer, got {precision!r}")
    return f"{op}:{decl[op]}" + ("" if precision is None else f":{key}={precision}")


def parse_retention(value: object, rollup: str, granularity: str) -> timedelta:
    """`"90d"` or `"36h"`: whole days or hours, at least one bucket of the table's granularity.

    No months or years: they have no fixed length, and a retention must be a fixed
    span so that every process computes the same horizon (write `365d`).
    """
    match = _RETENTION.match(value) if isinstance(value, str) else None
    if match is None:
        raise RollupSpecError(f"rollup {rollup!r}: retention {value!r} must be like '90d' or '36h' (days or hours)")
    retention = int(match[1]) * _RETENTION_UNITS[match[2]]
    if retention < timedelta(milliseconds=GRANULARITY_MS[granularity]):
        raise RollupSpecError(f"rollup {rollup!r}: retention {value} is shorter than one {granularity} bucket")
    return retention


def format_retention(retention: timedelta) -> str:
    """The canonical spelling: days when whole days, else hours (`parse_retention` reads it back)."""
    seconds = retention // timedelta(seconds=1)
    return f"{seconds // 86_400}d" if seconds % 86_400 == 0 else f"{seconds // 3_600}h"


def expiry_cutoff_ms(now_ms: int, retention: timedelta, granularity: str) -> int:
    """The start of the oldest bucket still inside the retention at `now_ms`: buckets before it are expired.

    `now - retention` floored to the granularity, so the bucket the horizon falls in
    is kept whole (a query `from=-90d` still sees its first bucket complete).
    An event is in an expired bucket exactly when its `ts` is below the cutoff.
    """
    width = GRANULARITY_MS[granularity]
    horizon = now_ms - retention // timedelta(milliseconds=1)
    return horizon - horizon % width


def definition(spec: RollupSpec) -> dict[str, Any]:
    """Everything that decides what a rollup's rows hold (not its name), canonically.

    Retention is left out on purpose: it decides how long rows are kept, not what
    they hold, so changing it needs no migration and fences no consumer.

    `granularities` is left out too: adding an hour table does not change one row of
    the base table, and a fingerprint change means "a different table" (refused, a
    new name, a backfill). A coarser table is a pure function of the base's rows, so
    `tally migrate` builds it from them; the registry records the stored set apart
    (`tally_rollups.granularities`, see `stored_text`) and a change to it bumps
    `rollups_version`, which fences consumers that would not write the new table.
    """
    return {
        "granularity": spec.granularity,
        "dimensions": [d.path for d in spec.dimensions],
        "measures": [m.declaration for m in spec.measures],
        "where": {path: list(values) for path, values in sorted(spec.where.items())},
    }


def fingerprint(spec: RollupSpec) -> str:
    """Changes when the rows a table would hold change, so a table is never reused for another definition."""
    return hashlib.sha256(orjson.dumps(definition(spec), option=orjson.OPT_SORT_KEYS)).hexdigest()


def _parse_granularities(raw: Mapping[str, Any], name: str) -> tuple[Granularity, tuple[Granularity, ...]]:
    """The base granularity and every stored one (ascending, base first) from `granularity`/`granularities`.

    The finest of `granularities` is the base; a `granularity` given beside them must
    name that finest one, so that a file never says two different things about the base.
    """
    given = raw.get("granularity")
    if given is not None and given not in TABLE_GRANULARITIES:
        raise RollupSpecError(f"rollup {name!r}: granularity must be one of {TABLE_GRANULARITIES}")
    listed = raw.get("granularities")
    if listed is None:
        base = cast(Granularity, given or "minute")
        return base, (base,)
    if not isinstance(listed, list) or not listed:
        raise RollupSpecError(f'rollup {name!r}: granularities must be a non-empty list like ["minute", "hour"]')
    bad = [g for g in listed if g not in TABLE_GRANULARITIES]
    if bad:
        raise RollupSpecError(
            f"rollup {name!r}: granularities {bad!r} are not stored granularities; use {', '.join(TABLE_GRANULARITIES)}"
        )
    if len(set(listed)) != len(listed):
        raise RollupSpecError(f"rollup {name!r}: granularities {listed!r} repeat one")
    stored: tuple[Granularity, ...] = tuple(sorted(listed, key=TABLE_GRANULARITIES.index))
    if given is not None and given != stored[0]:
        raise RollupSpecError(
            f"rollup {name!r}: granularity = {given!r} conflicts with granularities {listed!r}, whose finest "
            f"({stored[0]!r}) is the base; drop `granularity` or make it {stored[0]!r}"
        )
    return stored[0], stored


def stored_text(spec: RollupSpec) -> str:
    """The stored granularities as the registry records them: `minute,hour,day`."""
    return ",".join(spec.granularities)


def parse_stored_text(value: str | None, base: str) -> tuple[str, ...]:
    """`stored_text` read back; NULL (a registry row older than coarse tables) is the base alone."""
    return (base,) if not value else tuple(value.split(","))


def parse_rollup(raw: Mapping[str, Any]) -> RollupSpec:
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise RollupSpecError(f"rollup name {name!r} must match {_NAME.pattern}")
    granularity, granularities = _parse_granularities(raw, name)
    dims_raw = raw.get("dimensions", [])
    if not isinstance(dims_raw, list):
        raise RollupSpecError(f"rollup {name!r}: dimensions must be a list")
    dimensions = tuple(Dimension(_check_path(d, "dimension", name)) for d in dims_raw)
    measures = tuple(_parse_measure(m, name) for m in raw.get("measures", ["count"]))
    where_raw = raw.get("where", {})
    if not isinstance(where_raw, dict):
        raise RollupSpecError(f"rollup {name!r}: where must be a table of path = value(s)")
    where: dict[str, tuple[str, ...]] = {}
    for path, values in where_raw.items():
        _check_path(path, "where path", name)
        vals = values if isinstance(values, list) else [values]
        where[path] = tuple(dimension_text(v) for v in vals)
    retention_raw = raw.get("retention")
    retention = None if retention_raw is None else parse_retention(retention_raw, name, granularity)
    spec = RollupSpec(name, granularity, dimensions, measures, where, retention, granularities)
    columns = ["bucket", *spec.dimension_columns, *spec.measure_columns, *spec.average_fields]
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise RollupSpecError(f"rollup {name!r}: columns collide: {', '.join(duplicates)}")
    if not spec.measures:
        raise RollupSpecError(f"rollup {name!r}: at least one measure is needed")
    return spec


def parse_rollups(doc: Mapping[str, Any]) -> tuple[RollupSpec, ...]:
    items: Sequence[Mapping[str, Any]] = doc.get("rollup", [])
    specs = tuple(parse_rollup(r) for r in items)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise RollupSpecError("rollup names must be unique")
    owners: dict[str, str] = {}
    for spec in specs:
        for table in spec.tables:
            if table in owners:
                raise RollupSpecError(
                    f"table {table} would belong to rollups {owners[table]!r} and {spec.name!r}: "
                    f"rename one (a coarser table is agg_<name>__<granularity>)"
                )
            owners[table] = spec.name
    if not specs:
        raise RollupSpecError("no [[rollup]] is declared")
    return specs


def load_rollups(path: Path) -> tuple[RollupSpec, ...]:
    with path.open("rb") as f:
        return parse_rollups(tomllib.load(f))
