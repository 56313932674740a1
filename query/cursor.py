"""Opaque keyset cursors. Pure.

A cursor is `base64url(payload) "." base64url(HMAC-SHA256(secret, payload))` where
payload is orjson of `{"k": last row's order values, "q": query fingerprint,
"r": [aligned from, aligned to]}`. The signature makes a modified cursor a 400
instead of a wrong page or a 500; the fingerprint refuses a cursor from another
query; the pinned range keeps relative ranges (`from=-24h`) from sliding between
pages. Values are typed on the way back in, never trusted as SQL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Literal

import orjson

from core.problems import BadRequest
from query.timerange import TimeRange, format_instant

Kind = Literal["time", "text", "number"]
Value = datetime | str | Decimal | int | float | None


@dataclass(frozen=True, slots=True)
class Cursor:
    values: tuple[Value, ...]
    range: TimeRange


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(payload: bytes, secret: str) -> bytes:
    return hmac.new(secret.encode(), payload, hashlib.sha256).digest()


def _plain(value: Value) -> str | int | None:
    if isinstance(value, datetime):
        return format_instant(value)
    if isinstance(value, Decimal | int):  # an int: a distinct count (uniq_*)
        return str(value)
    if isinstance(value, float):  # a percentile: its shortest exact spelling, read back as a Decimal
        return repr(value)
    return value


def encode(values: tuple[Value, ...], fingerprint: str, range_: TimeRange, secret: str) -> str:
    payload = orjson.dumps(
        {
            "k": [_plain(v) for v in values],
            "q": fingerprint,
            "r": [format_instant(range_.start), format_instant(range_.end)],
        }
    )
    return f"{_b64(payload)}.{_b64(_sign(payload, secret))}"


def _invalid(reason: str) -> BadRequest:
    return BadRequest(f"invalid cursor: {reason}; start again without 'cursor'")


def _instant(raw: object) -> datetime:
    if not isinstance(raw, str):
        raise _invalid("malformed time")
    try:
        dt = datetime.fromisoformat(raw)
    except ValueError:
        raise _invalid("malformed time") from None
    if dt.tzinfo is None:
        raise _invalid("malformed time")
    return dt


def _typed(raw: object, kind: Kind) -> Value:
    if kind == "time":
        return _instant(raw)
    if kind == "text":
        if not isinstance(raw, str):
            raise _invalid("malformed value")
        return raw
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise _invalid("malformed number")
    try:
        number = Decimal(raw)
    except InvalidOperation:
        raise _invalid("malformed number") from None
    if not number.is_finite():
        raise _invalid("malformed number")
    return number


def decode(token: str, fingerprint: str, kinds: tuple[Kind, ...], secret: str) -> Cursor:
    """Verify and type a cursor for the query with `fingerprint` and order column `kinds`."""
    head, dot, tail = token.partition(".")
    if not dot:
        raise _invalid("not a Tally cursor")
    try:
        payload, signature = _unb64(head), _unb64(tail)
    except (binascii.Error, ValueError):
        raise _invalid("not a Tally cursor") from None
    if not hmac.compare_digest(signature, _sign(payload, secret)):
        raise _invalid("signature does not match")
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise _invalid("not a Tally cursor") from None
    if not isinstance(body, dict) or body.get("q") != fingerprint:
        raise _invalid("it belongs to a different query")
    values, range_ = body.get("k"), body.get("r")
    if not isinstance(values, list) or len(values) != len(kinds):
        raise _invalid("it belongs to a different query")
    if not isinstance(range_, list) or len(range_) != 2:
        raise _invalid("malformed range")
    typed = tuple(_typed(v, k) for v, k in zip(values, kinds, strict=True))
    return Cursor(typed, TimeRange(_instant(range_[0]), _instant(range_[1])))
