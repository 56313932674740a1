"""Time expressions (`from`, `to`) and their alignment to bucket boundaries. Pure.

A range is aligned to the query granularity (`from` floored, `to` ceiled) so
that every returned bucket is complete, and so that requests a few seconds apart
(`from=-24h`) normalize to the same range and therefore the same cache key.
Weeks are ISO weeks (Monday 00:00); months are calendar months.

Day, week and month boundaries are local midnights in the query's time zone
(`tz`, default UTC); minute and hour buckets are the same instants in every zone.
A local midnight that a DST change skips or repeats is resolved the way
PostgreSQL's `date_trunc(..., zone)` resolves it (the offset before a gap, the
offset after an overlap), so Python's range and Postgres's buckets agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from functools import cache
from zoneinfo import ZoneInfo, available_timezones

from core.problems import BadRequest
from schemas.reltime import relative_seconds
from schemas.rollups import granularity_rank

_DATE_ONLY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# A `+` in a query string decodes to a space unless the client percent-encodes it.
_SPACED_OFFSET = re.compile(r" (\d{2}(?::?\d{2})?)$")
# IANA names only: letters, digits and `/_+-`. Checked before a name is ever spelled into SQL.
_ZONE_NAME = re.compile(r"^[A-Za-z0-9/_+-]{1,64}$")
LOCAL_GRANULARITIES = frozenset({"day", "week", "month"})
_STEP_SECONDS = {"minute": 60, "hour": 3_600, "day": 86_400, "week": 604_800, "month": 2_629_746}


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


def parse_time(name: str, value: str, zone: tzinfo = UTC) -> TimeExpr:
    """Parse `now`, a relative offset (`-24h`, `+5m`, `-7d`, `-2w`, `-30s`) or ISO 8601 with an offset.

    A bare date (`2026-11-25`) means midnight in `zone` (the query's `tz`). A date-time
    without an offset is refused: guessing a time zone would silently shift every bucket.
    """
    text = value.strip()
    if text == "now":
        return TimeExpr()
    for candidate in (value, _restore_plus(value)):
        seconds = relative_seconds(candidate)
        if seconds is not None:
            return TimeExpr(offset_seconds=seconds)
    if _DATE_ONLY.match(text):
        try:
            return TimeExpr(localize(datetime.fromisoformat(text), zone).astimezone(UTC))
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


@cache
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones())


def parse_zone(value: str) -> ZoneInfo:
    """An IANA time zone by exact name (`Europe/Paris`, `UTC`); anything else is a 400."""
    if not _ZONE_NAME.match(value) or value not in _zone_names():
        raise BadRequest(f"unknown time zone {value[:64]!r} for 'tz': use an IANA name such as Europe/Paris or UTC")
    return ZoneInfo(value)


def localize(wall: datetime, zone: tzinfo) -> datetime:
    """Attach `zone` to a naive wall-clock time the way PostgreSQL does.

    A time skipped by a DST gap takes the offset from before the gap; a repeated
    time takes the offset from after the overlap (PostgreSQL's documented rule).
    """
    first, second = wall.replace(tzinfo=zone, fold=0), wall.replace(tzinfo=zone, fold=1)
    if first.utcoffset() == second.utcoffset():
        return first
    exists = first.astimezone(UTC).astimezone(zone).replace(tzinfo=None) == wall
    return second if exists else first


def _floor_wall(wall: datetime, granularity: str) -> datetime:
    if granularity == "minute":
        return wall.replace(second=0, microsecond=0)
    if granularity == "hour":
        return wall.replace(minute=0, second=0, microsecond=0)
    day = wall.replace(hour=0, minute=0, second=0, microsecond=0)
    if granularity == "day":
        return day
    if granularity == "week":
        return day - timedelta(days=day.weekday())
    if granularity == "month":
        return day.replace(day=1)
    raise ValueError(f"unknown granularity {granularity!r}")


def _next_wall(start: datetime, granularity: str) -> datetime:
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


def _frame(granularity: str, zone: tzinfo) -> tzinfo:
    """Minute and hour buckets are UTC instants; only day, week and month follow local midnight."""
    return zone if granularity in LOCAL_GRANULARITIES else UTC


def floor(dt: datetime, granularity: str, zone: tzinfo = UTC) -> datetime:
    """Start of the bucket containing `dt`, as a UTC instant."""
    frame = _frame(granularity, zone)
    wall = _floor_wall(dt.astimezone(frame).replace(tzinfo=None), granularity)
    return localize(wall, frame).astimezone(UTC)


def next_boundary(start: datetime, granularity: str, zone: tzinfo = UTC) -> datetime:
    """The bucket start after the aligned `start`."""
    frame = _frame(granularity, zone)
    wall = _floor_wall(start.astimezone(frame).replace(tzinfo=None), granularity)
    return localize(_next_wall(wall, granularity), frame).astimezone(UTC)


def ceil(dt: datetime, granularity: str, zone: tzinfo = UTC) -> datetime:
    """Smallest bucket boundary >= `dt`, as a UTC instant."""
    start = floor(dt, granularity, zone)
    return start if start == dt else next_boundary(start, granularity, zone)


@dataclass(frozen=True, slots=True)
class TimeRange:
    """An aligned half-open range [start, end) of bucket starts."""

    start: datetime
    end: datetime

    def buckets(self, granularity: str) -> int:
        """How many buckets the range spans (months and DST days counted at their average length)."""
        seconds = (self.end - self.start).total_seconds()
        return max(0, round(seconds / _STEP_SECONDS[granularity]))


def align(from_: TimeExpr, to: TimeExpr, granularity: str, now: datetime, zone: tzinfo = UTC) -> TimeRange:
    """Resolve and align a range; refuses `from` after `to` and instants out of range."""
    try:
        lo, hi = from_.resolve(now), to.resolve(now)
        if lo > hi:
            raise BadRequest(f"'from' ({format_instant(lo)}) is after 'to' ({format_instant(hi)})")
        return TimeRange(floor(lo, granularity, zone), ceil(hi, granularity, zone))
    except (OverflowError, ValueError):
        raise BadRequest("'from' or 'to' is outside the supported date range") from None


def offsets_fit(zone: tzinfo, range_: TimeRange, table_granularity: str) -> bool:
    """Whether local midnights in `zone` fall on the table's bucket boundaries across the range.

    Hourly buckets cannot be merged exactly into the days of a +05:30 zone, nor daily
    buckets into any zone but UTC. The offset is sampled daily: DST changes last months.
    """
    unit = _STEP_SECONDS[table_granularity] if table_granularity in ("minute", "hour") else None
    instant = range_.start
    for _ in range(40_000):
        offset = instant.astimezone(zone).utcoffset()
        seconds = int(offset.total_seconds()) if offset is not None else 0
        if (seconds % unit) if unit else seconds:
            return False
        if instant >= range_.end:
            break
        instant = min(instant + timedelta(days=1), range_.end)
    return True


def nests(table_granularity: str, granularity: str, zone: tzinfo, range_: TimeRange) -> bool:
    """Whether every `granularity` bucket of `zone` in `range_` is a whole number of the table's buckets.

    The one rule for merging stored buckets into coarser ones: parameters refuse a query the
    base table cannot serve by it, and the planner picks the coarsest stored table that
    passes it. Minute and hour buckets are UTC instants, so any finer table serves them; a
    day, week or month follows local midnight, which must fall on the table's boundaries.
    """
    if granularity_rank(table_granularity) > granularity_rank(granularity):
        return False
    return granularity not in LOCAL_GRANULARITIES or offsets_fit(zone, range_, table_granularity)


def on_boundaries(range_: TimeRange, table_granularity: str) -> bool:
    """Whether both ends of `range_` are bucket starts of a (UTC) table of `table_granularity`."""
    return all(floor(edge, table_granularity) == edge for edge in (range_.start, range_.end))
