"""Serialize a page of rows as JSON rows, JSON columns or CSV. Pure.

Measures are Postgres numerics (Decimal). orjson cannot serialize Decimal and
floats would round, so each Decimal is written as its exact decimal text
(`orjson.Fragment`): `0.1 + 0.2` stays `0.3`. Buckets are RFC 3339 UTC with `Z`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson

from query.params import RollupQuery
from query.timerange import format_instant

MEDIA_TYPES = {"json": "application/json", "columns": "application/json", "csv": "text/csv; charset=utf-8"}


@dataclass(frozen=True, slots=True)
class Rendered:
    body: bytes
    media_type: str


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        # Non-finite numerics have no JSON spelling; Tally never stores them, but never emit invalid JSON.
        return orjson.Fragment(str(value).encode()) if value.is_finite() else None
    raise TypeError(f"cannot serialize {type(value).__name__}")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default, option=orjson.OPT_UTC_Z)


def meta(q: RollupQuery, rows: int, elapsed_ms: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rollup": q.rollup,
        "granularity": q.granularity,
        "from": format_instant(q.range.start),
        "to": format_instant(q.range.end),
        "fields": list(q.fields),
        "filters": q.filter_map,
        "order": [o.spelled for o in q.order],
        "limit": q.limit,
        "rows": rows,
        "elapsed_ms": round(elapsed_ms, 3),
    }
    if q.offset:
        out["offset"] = q.offset
    return out


def _csv_cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return format_instant(value)
    return value  # str() of a Decimal is exact


def render(q: RollupQuery, rows: Sequence[Sequence[object]], next_cursor: str | None, elapsed_ms: float) -> Rendered:
    if q.format == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180
        writer.writerow(q.fields)
        writer.writerows([_csv_cell(v) for v in row] for row in rows)
        return Rendered(buffer.getvalue().encode(), MEDIA_TYPES["csv"])
    data: Any
    if q.format == "columns":
        data = {f: [row[i] for row in rows] for i, f in enumerate(q.fields)}
    else:
        data = [dict(zip(q.fields, row, strict=True)) for row in rows]
    body = dumps({"data": data, "next_cursor": next_cursor, "meta": meta(q, len(rows), elapsed_ms)})
    return Rendered(body, MEDIA_TYPES[q.format])
