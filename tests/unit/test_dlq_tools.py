"""The pure parts of `tally dlq`: --since, previews, what replay skips, the headers it sends."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from consumers.dlq_tools import (
    DlqError,
    Letter,
    describe,
    parse_since,
    preview,
    replay_headers,
    skip_reason,
)
from core.cli import _attach_relative_times

NOW = datetime(2026, 11, 25, 13, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


def letter(value: bytes | None = b"{}", ts: int = NOW_MS, **headers: str) -> Letter:
    return Letter(2, 17, ts, b"k", value, tuple((k.replace("_", "-"), v.encode()) for k, v in headers.items()))


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        (None, None),
        ("-1h", NOW_MS - 3_600_000),
        ("-30m", NOW_MS - 1_800_000),
        ("-45s", NOW_MS - 45_000),
        ("-7d", NOW_MS - 7 * 86_400_000),
        ("-2w", NOW_MS - 14 * 86_400_000),
        ("2026-11-25T12:00:00Z", NOW_MS - 3_600_000),
        ("2026-11-25T13:00:00+01:00", NOW_MS - 3_600_000),
    ],
)
def test_since(text: str | None, ms: int | None) -> None:
    assert parse_since(text, NOW) == ms


@pytest.mark.parametrize("text", ["yesterday", "+1h", "2026-11-25T12:00:00", "-1y"])
def test_since_refuses_what_it_cannot_place(text: str) -> None:
    with pytest.raises(DlqError):
        parse_since(text, NOW)


def test_relative_times_survive_argparse() -> None:
    assert _attach_relative_times(["dlq", "replay", "--since", "-1h", "--dry-run"]) == [
        "dlq", "replay", "--since=-1h", "--dry-run",
    ]
    assert _attach_relative_times(["backfill", "r", "--from", "-7d"]) == ["backfill", "r", "--from=-7d"]
    assert _attach_relative_times(["dlq", "inspect", "--since", "2026-11-25T12:00:00Z"])[-1] == "2026-11-25T12:00:00Z"
    assert _attach_relative_times(["dlq", "inspect", "--limit", "-5"]) == ["dlq", "inspect", "--limit", "-5"]


def test_preview_is_one_line_bounded_and_sized() -> None:
    assert preview(None) == "(no value)"
    assert preview(b"not json") == "not json (8 bytes)"
    assert preview(b"a\nb\x00\xff") == "a\\nb\\x00\\xff (5 bytes)"
    long = preview(b"x" * 1000, chars=10)
    assert long == "xxxxxxxxxx… (1000 bytes)"


def test_describe_names_position_time_origin_reason_and_value() -> None:
    text = describe(letter(b"oops", tally_error="record is not JSON", tally_source_topic="tally.events",
                           tally_source_partition="1", tally_source_offset="9"))
    assert text.splitlines() == [
        "2:17  2026-11-25T13:00:00.000Z  from tally.events[1]@9",
        "    error: record is not JSON",
        "    value: oops (4 bytes)",
    ]
    assert "tally-replay-of: tally.events.dlq/0/3" in describe(letter(tally_replay_of="tally.events.dlq/0/3"))
    assert "from ?[?]@?" in describe(letter())


def test_what_replay_skips() -> None:
    assert skip_reason(letter(), None, include_replayed=False) is None
    assert skip_reason(letter(ts=NOW_MS - 1), NOW_MS, include_replayed=False) == "before --since"
    assert skip_reason(letter(ts=NOW_MS), NOW_MS, include_replayed=False) is None
    assert skip_reason(letter(tally_truncated_from="3000000"), None, include_replayed=True).startswith("truncated")
    again = letter(tally_replay_of="tally.events.dlq/0/3")
    assert skip_reason(again, None, include_replayed=False).startswith("came back from an earlier replay")
    assert skip_reason(again, None, include_replayed=True) is None


def test_replay_keeps_the_original_headers_and_names_the_dead_letter() -> None:
    dead = letter(tally_schema="1", tally_request_id="r1", tally_error="bad", tally_source_topic="t",
                  tally_source_partition="0", tally_source_offset="4", tally_replay_of="d/1/1")
    assert replay_headers(dead, "tally.events.dlq") == [
        ("tally-schema", b"1"), ("tally-request-id", b"r1"), ("tally-replay-of", b"tally.events.dlq/2/17"),
    ]
