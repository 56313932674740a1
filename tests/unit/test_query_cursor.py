"""Cursors round-trip exactly and refuse tampering, foreign queries and garbage with a 400."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest

from core.problems import BadRequest
from query.cursor import Kind, Value, decode, encode
from query.timerange import TimeRange

SECRET = "s3cret"  # noqa: S105 - a test key
RANGE = TimeRange(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 8, tzinfo=UTC))
KINDS: tuple[Kind, ...] = ("number", "time", "text", "number")
VALUES: tuple[Value, ...] = (None, datetime(2026, 11, 2, 13, tzinfo=UTC), "pur,chase\"", Decimal("12.3400"))


def test_round_trip_is_exact() -> None:
    token = encode(VALUES, "fp", RANGE, SECRET)
    cursor = decode(token, "fp", KINDS, SECRET)
    assert cursor.values == VALUES
    assert str(cursor.values[3]) == "12.3400"
    assert cursor.range == RANGE
    assert token.isascii() and "=" not in token and "+" not in token and "/" not in token  # URL-safe


def _tamper(token: str) -> str:
    head, _, sig = token.partition(".")
    payload = orjson.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    payload["k"][3] = "0"
    forged = base64.urlsafe_b64encode(orjson.dumps(payload)).rstrip(b"=").decode()
    return f"{forged}.{sig}"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_tamper, "signature"),
        (lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"), "signature"),
        (lambda t: t.replace(".", ""), "not a Tally cursor"),
        (lambda t: "!!!." + t.split(".")[1], "invalid cursor"),
        (lambda t: "", "not a Tally cursor"),
    ],
)
def test_tampering_is_a_bad_request(mutate: object, reason: str) -> None:
    token = encode(VALUES, "fp", RANGE, SECRET)
    with pytest.raises(BadRequest, match=reason):
        decode(mutate(token), "fp", KINDS, SECRET)  # type: ignore[operator]


def test_other_query_other_secret_other_shape() -> None:
    token = encode(VALUES, "fp", RANGE, SECRET)
    with pytest.raises(BadRequest, match="different query"):
        decode(token, "another", KINDS, SECRET)
    with pytest.raises(BadRequest, match="signature"):
        decode(token, "fp", KINDS, "other-secret")
    with pytest.raises(BadRequest, match="different query"):
        decode(token, "fp", KINDS[:3], SECRET)


def test_signed_but_mistyped_values_are_refused() -> None:
    # A correctly signed cursor whose values do not fit the columns (e.g. after a spec change).
    token = encode(("not-a-time",), "fp", RANGE, SECRET)
    with pytest.raises(BadRequest, match="malformed time"):
        decode(token, "fp", ("time",), SECRET)
    token = encode(("NaN",), "fp", RANGE, SECRET)
    with pytest.raises(BadRequest, match="malformed number"):
        decode(token, "fp", ("number",), SECRET)
    token = encode((None,), "fp", RANGE, SECRET)
    with pytest.raises(BadRequest, match="malformed value"):
        decode(token, "fp", ("text",), SECRET)
