"""Time expressions (`from`, `to`) and their alignment to bucket boundaries. Pure.

A range is aligned to the query granularity in UTC (`from` floored, `to` ceiled)
so that every returned bucket is complete, and so that requests a few seconds
apart (`from=-24h`) normalize to the same range and therefore the same cache key.
Weeks are ISO weeks (Monday 00:00 UTC); months are calendar months.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from core.problems import BadRequest

_RELATIVE = re.compile(r"^([+-])(\d{1,9})([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}
_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# A `+` in a query string decodes to a space unless the client percent-encodes it.
_SPACED_OFFSET = re.compile(r" (\d{2}(?::?\d{2})?)$")


@dataclass(frozen=True, slots=True)
class TimeExpr:
    """A parsed `from`/`to`: an absolute instant, or seconds relative to the request's `now`."""

    absolute: datetime | None = None
    offset_seconds: int = 0

    @property
    def relative(self) -> bool:
        return self.absolute is None

    @property
    def canonical(self) -> str:
        """A spelling that is equal for equal expressions (used in query fingerprints)."""
        if self.absolute is not None:
            return format_instant(self.absolute)
        return "now" if self.offset_seconds == 0 else f"now{self.offset_seconds:+d}s"

    def resolve(self, now: datetime) -> datetime:
        if self.absolute is not None:
            return self.absolute
        return now + timedelta(seconds=self.offset_seconds)


def format_instant(dt: datetime) -> str:
    """RFC 3339 in UTC with a `Z`, the one spelling the API emits."""
    text = dt.astimezone(UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def parse_time(name: str, value: str) -> TimeExpr:
    """Parse `now`, a relative offset (`-24h`, `+5m`, `-7d`, `-2w`, `-30s`) or ISO 8601 with an offset.

    A bare date (`2026-11-25`) means midnight UTC. A date-time without an offset is
    refused: guessing a time zone would silently shift every bucket.
    """
    text = value.strip()
    if text == "now":
        return TimeExpr()
    for candidate in (value, _restore_plus(value)):
        match = _RELATIVE.match(candidate)
        if match:
            sign, amount, unit = match.groups()
            seconds = int(amount) * _UNIT_SECONDS[unit]
            return TimeExpr(offset_seconds=-seconds if sign == "-" else seconds)
    if _DATE_ONLY.match(text):
        try:
            return TimeExpr(datetime.fromisoformat(text).replace(tzinfo=UTC))
        except ValueError:
            raise _bad(name, value) from None
    parsed: datetime | None = None
    for candidate in (text, _restore_plus(value).strip()):
        try:
            parsed = datetime.fromisoformat(candidate)
            break
        except ValueError:
            continue
    if parsed is None:
        raise _bad(name, value)
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise BadRequest(f"'{name}' needs a UTC offset (e.g. 2026-11-25T13:00:00Z), got {value!r}")
    return TimeExpr(parsed.astimezone(UTC))


def _restore_plus(value: str) -> str:
    if value.startswith(" "):
        value = "+" + value[1:]
    return _SPACED_OFFSET.sub(r"+\1", value)


def _bad(name: str, value: str) -> BadRequest:
    return BadRequest(
        f"'{name}' must be ISO 8601 with an offset, 'now', or relative like -24h, -30m, +5m, -7d, -2w; got {value!r}"
    )


def floor(dt: datetime, granularity: str) -> datetime:
    """Start of the bucket containing `dt` (UTC)."""
    dt = dt.astimezone(UTC)
    if granularity == "minute":
        return dt.replace(second=0, microsecond=0)
    if granularity == "hour":
        return dt.replace(minute=0, second=0, microsecond=0)
    day = dt.replace(hour=0, minute=0, second=0, microsecond=0)
    if granularity == "day":
        return day
    if granularity == "week":
        return day - timedelta(days=day.weekday())
    if granularity == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown granularity {granularity!r}")


def next_boundary(start: datetime, granularity: str) -> datetime:
    """The bucket start after the aligned `start`."""
    if granularity == "month":
        if start.month == 12:
            return start.replace(year=start.year + 1, month=1)
        return start.replace(month=start.month + 1)
    step = {
        "minute": timedelta(minutes=1),
        "hour": timedelta(hours=1),
        "day": timedelta(days=1),
        "week": timedelta(weeks=1),
    }[granularity]
    return start + step


def ceil(dt: datetime, granularity: str) -> datetime:
    """Smallest bucket boundary >= `dt` (UTC)."""
    start = floor(dt, granularity)
    return start if start == dt else next_boundary(start, granularity)


@dataclass(frozen=True, slots=True)
class TimeRange:
    """An aligned half-open range [start, end) of bucket starts."""

    start: datetime
    end: datetime


def align(from_: TimeExpr, to: TimeExpr, granularity: str, now: datetime) -> TimeRange:
    """Resolve and align a range; refuses `from` after `to` and instants out of range."""
    try:
        lo, hi = from_.resolve(now), to.resolve(now)
        if lo > hi:
            raise BadRequest(f"'from' ({format_instant(lo)}) is after 'to' ({format_instant(hi)})")
        return TimeRange(floor(lo, granularity), ceil(hi, granularity))
    except (OverflowError, ValueError):
        raise BadRequest("'from' or 'to' is outside the supported date range") from None
