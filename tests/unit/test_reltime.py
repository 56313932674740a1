"""The one relative-time grammar (schemas.reltime), and every place that reads it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from consumers import backfill, dlq_tools
from core.cli import _attach_relative_times, _parser
from query.timerange import parse_time
from schemas.reltime import relative_seconds

NOW = datetime(2026, 11, 25, 13, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("-30s", -30), ("-15m", -900), ("-1h", -3_600), ("-7d", -604_800), ("-2w", -1_209_600), ("+5m", 300),
     ("-0s", 0), ("-999999999s", -999_999_999)],
)
def test_relative_spellings(text: str, seconds: int) -> None:
    assert relative_seconds(text) == seconds


@pytest.mark.parametrize(  # no bare numbers, months, spaces, fractions, other digits, a newline
    "text", ["", "1h", "-1", "-h", "-1y", "-1M", "-1H", " -1h", "-1h ", "--1h", "-1.5h", "-1000000000s", "-1h30m",
             "now", "2026-11-25T13:00:00Z", "-٣h", "-1h\n"],
)
def test_what_is_not_relative(text: str) -> None:
    assert relative_seconds(text) is None


def test_the_query_api_the_dlq_tools_and_the_backfill_read_the_same_spellings() -> None:
    for text in ("-30s", "-15m", "-1h", "-7d", "-2w"):
        seconds = relative_seconds(text)
        assert seconds is not None
        assert parse_time("from", text).offset_seconds == seconds
        assert dlq_tools.parse_since(text, NOW) == NOW_MS + seconds * 1000
        assert backfill.parse_since(text, NOW) == NOW_MS + seconds * 1000
    with pytest.raises(backfill.BackfillError, match="in the future"):
        backfill.parse_since("+1h", NOW)  # the CLI tools look back only
    with pytest.raises(dlq_tools.DlqError, match="in the future"):
        dlq_tools.parse_since("+1h", NOW)


@pytest.mark.parametrize("option", ["--from", "--since"])
@pytest.mark.parametrize("when", ["-30s", "-1h", "earliest", "2026-11-25T12:00:00Z"])
def test_backfill_takes_since_as_an_alias_of_from(option: str, when: str) -> None:
    args = _parser().parse_args(_attach_relative_times(["backfill", "by_source", option, when]))
    assert (args.rollup, args.since) == ("by_source", when)


def test_relative_times_survive_argparse_whatever_the_sign() -> None:
    assert _attach_relative_times(["dlq", "inspect", "--since", "-45s"]) == ["dlq", "inspect", "--since=-45s"]
    assert _attach_relative_times(["dlq", "inspect", "--since", "+1h"]) == ["dlq", "inspect", "--since=+1h"]
    assert _attach_relative_times(["dlq", "inspect", "--limit", "-5"]) == ["dlq", "inspect", "--limit", "-5"]
