"""Serialize a page of rows as JSON rows, JSON columns or CSV. Pure.

CSV text cells that a spreadsheet would run as a formula get a leading `'` (see
`neutralize`); JSON carries every value as stored.

Measures are Postgres numerics (Decimal). orjson cannot serialize Decimal and
floats would round, so each Decimal is written as its exact decimal text
(`orjson.Fragment`): `0.1 + 0.2` stays `0.3`. Buckets are RFC 3339: UTC with `Z`,
or with the offset of the query's `tz`.

A JSON body is rendered once and cached as bytes. What differs per response (the
cache outcome, the entry's age, the time taken) is spliced into the end of `meta`
by `serving()`, so a hit is never parsed or re-serialized, and the stored bytes,
which the ETag hashes, change only when the data does.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
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


def meta(
    q: RollupQuery, rows: int, rows_read: int, total: int | None, source: tuple[str, str] | None = None
) -> dict[str, Any]:
    """The query as normalized, what it read, and (`source`: table, its granularity) which table answered."""
    out: dict[str, Any] = {
        "rollup": q.rollup,
        "granularity": q.granularity,
        "tz": q.zone,
        "from": format_instant(q.range.start),
        "to": format_instant(q.range.end),
        "fields": list(q.fields),
        "filters": {**q.filter_map, **{m: [b.spelled for b in bs] for m, bs in q.bounds}},
        "order": [o.spelled for o in q.order],
        "limit": q.limit,
        "rows": rows,
        "rows_read": rows_read,
    }
    if source is not None:
        out["table"], out["table_granularity"] = source
    if q.offset:
        out["offset"] = q.offset
    if total is not None:
        out["total"] = total
    return out


def serving(body: bytes, extra: dict[str, Any]) -> bytes:
    """`body` with `extra` appended to its `meta`, which `render` always writes last."""
    return body[:-2] + b"," + orjson.dumps(extra)[1:] + b"}"


def _localized(q: RollupQuery, rows: Sequence[Sequence[object]]) -> Sequence[Sequence[object]]:
    if q.zone == "UTC" or "bucket" not in q.fields:
        return rows
    at, zone = q.fields.index("bucket"), q.tzinfo
    return [[v.astimezone(zone) if i == at and isinstance(v, datetime) else v for i, v in enumerate(r)] for r in rows]


# A spreadsheet opening the CSV runs a cell that starts with one of these as a formula
# (OWASP "CSV injection"): `=HYPERLINK(...)`, `@SUM(...)`, `-2+3`, a TAB or CR before `=`.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# A JSON number, which is how a numeric property is stored as a dimension value: data, not a formula.
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def neutralize(text: str) -> str:
    """`text` with a `'` in front when a spreadsheet would run it as a formula.

    Applied to text cells (dimension values) only: measures are numbers, and a negative
    number, as a measure or as a dimension value that is a JSON number, is data.
    """
    if text.startswith(_FORMULA_START) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def _csv_cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, str):
        return neutralize(value)
    if isinstance(value, datetime):
        return format_instant(value) if value.tzinfo is UTC else value.isoformat()
    return value  # str() of a Decimal is exact


def csv_header(q: RollupQuery) -> bytes:
    return _csv_text([q.fields])


def csv_rows(q: RollupQuery, rows: Sequence[Sequence[object]]) -> bytes:
    return _csv_text([_csv_cell(v) for v in row] for row in _localized(q, rows))


def _csv_text(rows: Iterable[Iterable[object]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)  # RFC 4180
    return buffer.getvalue().encode()


def render(
    q: RollupQuery,
    rows: Sequence[Sequence[object]],
    next_cursor: str | None,
    *,
    rows_read: int,
    total: int | None,
    source: tuple[str, str] | None = None,
) -> Rendered:
    if q.format == "csv":
        return Rendered(csv_header(q) + csv_rows(q, rows), MEDIA_TYPES["csv"])
    local = _localized(q, rows)
    data: Any
    if q.format == "columns":
        data = {f: [row[i] for row in local] for i, f in enumerate(q.fields)}
    else:
        data = [dict(zip(q.fields, row, strict=True)) for row in local]
    body = dumps({"data": data, "next_cursor": next_cursor, "meta": meta(q, len(rows), rows_read, total, source)})
    return Rendered(body, MEDIA_TYPES[q.format])
