"""Time expressions and bucket alignment: relative, ISO, week and month boundaries (UTC)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from core.problems import BadRequest
from query.timerange import TimeExpr, align, ceil, floor, format_instant, parse_time

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
