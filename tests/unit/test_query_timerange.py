"""Time expressions and bucket alignment: relative, ISO, weeks and months, in UTC and in local zones."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from core.problems import BadRequest
from query.timerange import (
    TimeExpr,
    TimeRange,
    align,
    ceil,
    floor,
    format_instant,
    localize,
    offsets_fit,
    parse_time,
    parse_zone,
)

NOW = datetime(2026, 11, 25, 13, 37, 42, 123456, tzinfo=UTC)  # a Wednesday


@pytest.mark.parametrize(
    ("text", "offset"),
    [("now", 0), ("-24h", -86_400), ("-30m", -1_800), ("+5m", 300), ("-7d", -604_800), ("-2w", -1_209_600),
     ("-15s", -15), (" 5m", 300)],  # " 5m": a `+` that arrived unencoded in a query string
)
def test_relative(text: str, offset: int) -> None:
    expr = parse_time("from", text)
    assert expr.relative and expr.offset_seconds == offset
    assert expr.resolve(NOW) == NOW + timedelta(seconds=offset)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-25T13:00:00Z", datetime(2026, 11, 25, 13, tzinfo=UTC)),
        ("2026-11-25T14:30:00+01:30", datetime(2026, 11, 25, 13, tzinfo=UTC)),
        ("2026-11-25T08:00:00-05:00", datetime(2026, 11, 25, 13, tzinfo=UTC)),
        ("2026-11-25T14:00:00 01:00", datetime(2026, 11, 25, 13, tzinfo=UTC)),  # unencoded `+`
        ("2026-11-25", datetime(2026, 11, 25, tzinfo=UTC)),
    ],
)
def test_absolute(text: str, expected: datetime) -> None:
    expr = parse_time("to", text)
    assert not expr.relative
    assert expr.resolve(NOW) == expected
    assert expr.resolve(NOW).tzinfo is UTC


@pytest.mark.parametrize("text", ["yesterday", "-24x", "24h", "2026-11-25T13:00:00", "2026-13-01", "", "-h",
                                  "now()", "-1d;DROP TABLE x"])
def test_invalid_names_the_parameter(text: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_time("from", text)
    assert "'from'" in str(err.value.detail)


@pytest.mark.parametrize(
    ("granularity", "down", "up"),
    [
        ("minute", datetime(2026, 11, 25, 13, 37, tzinfo=UTC), datetime(2026, 11, 25, 13, 38, tzinfo=UTC)),
        ("hour", datetime(2026, 11, 25, 13, tzinfo=UTC), datetime(2026, 11, 25, 14, tzinfo=UTC)),
        ("day", datetime(2026, 11, 25, tzinfo=UTC), datetime(2026, 11, 26, tzinfo=UTC)),
        ("week", datetime(2026, 11, 23, tzinfo=UTC), datetime(2026, 11, 30, tzinfo=UTC)),  # Monday to Monday
        ("month", datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)),
    ],
)
def test_floor_and_ceil(granularity: str, down: datetime, up: datetime) -> None:
    assert floor(NOW, granularity) == down
    assert ceil(NOW, granularity) == up
    assert ceil(down, granularity) == down  # a boundary stays put
    assert floor(down, granularity) == down


def test_alignment_is_in_utc_whatever_the_offset() -> None:
    # 2026-03-01T00:30+01:00 is still February in UTC.
    dt = datetime(2026, 3, 1, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    assert floor(dt, "month") == datetime(2026, 2, 1, tzinfo=UTC)
    assert floor(dt, "day") == datetime(2026, 2, 28, tzinfo=UTC)


def test_week_and_month_edges() -> None:
    sunday = datetime(2026, 3, 1, 23, 59, tzinfo=UTC)
    assert floor(sunday, "week") == datetime(2026, 2, 23, tzinfo=UTC)
    assert ceil(datetime(2026, 12, 31, 1, tzinfo=UTC), "month") == datetime(2027, 1, 1, tzinfo=UTC)
    assert ceil(datetime(2024, 2, 29, 1, tzinfo=UTC), "month") == datetime(2024, 3, 1, tzinfo=UTC)
    # Week 1 of 2026 starts on Monday 2025-12-29.
    assert floor(datetime(2026, 1, 1, tzinfo=UTC), "week") == datetime(2025, 12, 29, tzinfo=UTC)


def test_align_defaults_and_order() -> None:
    rng = align(parse_time("from", "-24h"), parse_time("to", "now"), "hour", NOW)
    assert rng.start == datetime(2026, 11, 24, 13, tzinfo=UTC)
    assert rng.end == datetime(2026, 11, 25, 14, tzinfo=UTC)
    with pytest.raises(BadRequest, match="after"):
        align(parse_time("from", "now"), parse_time("to", "-1h"), "minute", NOW)
    with pytest.raises(BadRequest, match="range"):
        align(TimeExpr(offset_seconds=-(10**9) * 604_800), TimeExpr(), "minute", NOW)


def test_format_instant_uses_z() -> None:
    assert format_instant(datetime(2026, 11, 25, 14, tzinfo=timezone(timedelta(hours=1)))) == "2026-11-25T13:00:00Z"
    assert TimeExpr(offset_seconds=-60).canonical == "now-60s"
    assert TimeExpr().canonical == "now"


PARIS, NEW_YORK, KOLKATA = ZoneInfo("Europe/Paris"), ZoneInfo("America/New_York"), ZoneInfo("Asia/Kolkata")


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def wall(*args: int) -> datetime:
    """A naive local wall-clock time, as `localize` takes it."""
    return datetime(*args)  # type: ignore[misc]  # noqa: DTZ001


def test_local_days_weeks_and_months_across_dst() -> None:
    # Paris springs forward on Sunday 2026-03-29: that day is 23 hours long.
    assert floor(at(2026, 3, 29, 12), "day", PARIS) == at(2026, 3, 28, 23)
    assert ceil(at(2026, 3, 29, 12), "day", PARIS) == at(2026, 3, 29, 22)
    assert floor(at(2026, 3, 28, 22, 59), "day", PARIS) == at(2026, 3, 27, 23)  # 23:59 on the 28th, Paris
    assert floor(at(2026, 3, 29, 12), "week", PARIS) == at(2026, 3, 22, 23)  # Monday 23rd, 00:00 +01:00
    assert floor(at(2026, 4, 15), "month", PARIS) == at(2026, 3, 31, 22)  # April 1st, 00:00 +02:00
    assert ceil(at(2026, 10, 20), "month", PARIS) == at(2026, 10, 31, 23)  # November 1st, 00:00 +01:00
    # Minute and hour buckets are instants: the zone does not move them, even at +05:30.
    assert floor(at(2026, 3, 29, 12, 47), "hour", KOLKATA) == at(2026, 3, 29, 12)
    assert floor(at(2026, 3, 29, 12), "day", KOLKATA) == at(2026, 3, 28, 18, 30)


def test_skipped_and_repeated_wall_times_follow_postgres() -> None:
    """PostgreSQL's documented examples: a skipped 02:30 takes the offset before the gap,
    a repeated 01:30 the offset after the overlap."""
    assert localize(wall(2018, 3, 11, 2, 30), NEW_YORK).astimezone(UTC) == at(2018, 3, 11, 7, 30)
    assert localize(wall(2018, 11, 4, 1, 30), NEW_YORK).astimezone(UTC) == at(2018, 11, 4, 6, 30)
    assert localize(wall(2018, 7, 1, 0, 0), NEW_YORK).astimezone(UTC) == at(2018, 7, 1, 4)
    # Sao Paulo's DST began at midnight: 2018-11-04 00:00 did not exist; the day began at 00:00 -03:00.
    assert floor(at(2018, 11, 4, 12), "day", ZoneInfo("America/Sao_Paulo")) == at(2018, 11, 4, 3)


def test_bare_dates_are_local_midnights() -> None:
    assert parse_time("from", "2026-07-14", PARIS).resolve(NOW) == at(2026, 7, 13, 22)
    assert parse_time("from", "2026-07-14").resolve(NOW) == at(2026, 7, 14)


def test_zones_are_iana_names_only() -> None:
    assert parse_zone("Europe/Paris") == PARIS
    for bad in ("europe/paris", "Mars/Olympus", "UTC'; DROP TABLE x; --", "../../etc/passwd", "", "+05:30"):
        with pytest.raises(BadRequest, match="unknown time zone"):
            parse_zone(bad)


def test_offsets_fit_the_table_buckets() -> None:
    year = TimeRange(at(2026, 1, 1), at(2027, 1, 1))
    assert offsets_fit(KOLKATA, year, "minute") and offsets_fit(PARIS, year, "hour")
    assert not offsets_fit(KOLKATA, year, "hour")  # +05:30 days cut hourly buckets in half
    assert not offsets_fit(PARIS, year, "day") and offsets_fit(ZoneInfo("UTC"), year, "day")
    # Lord Howe is +10:30, and +11:00 in its summer: only a summer range fits hourly buckets.
    lord_howe = ZoneInfo("Australia/Lord_Howe")
    assert offsets_fit(lord_howe, TimeRange(at(2026, 1, 1), at(2026, 2, 1)), "hour")
    assert not offsets_fit(lord_howe, TimeRange(at(2026, 1, 1), at(2026, 7, 1)), "hour")


def test_bucket_counts() -> None:
    day = TimeRange(at(2026, 11, 24), at(2026, 11, 25))
    assert (day.buckets("minute"), day.buckets("hour"), day.buckets("day")) == (1_440, 24, 1)
    year = TimeRange(at(2026, 1, 1), at(2027, 1, 1))
    assert (year.buckets("minute"), year.buckets("week"), year.buckets("month")) == (525_600, 52, 12)
