"""A newcomer's usual first mistakes get refusals that say what to do (issue 15).

Epoch seconds sent as `ts`, a `ts` outside the window, and one bare event object as the
body: each refusal shows the values it judged and, where the mistake is recognisable, the fix.
"""

from __future__ import annotations

import pytest

from core.problems import BadRequest
from ingest.body import parse_batch
from schemas.events import EventLimits, InvalidEvent, normalize_event

NOW = 1_795_600_000_000  # 2026-11-25T09:46:40Z
LIMITS = EventLimits()  # lateness 604800 s, future 300 s
START = "2026-11-18T09:46:40Z"  # NOW - 7 days: the lateness window's start
END = "2026-11-25T09:51:40Z"  # NOW + 300 s: the future window's end
SECONDS_HINT = ": did you send seconds? ts takes epoch milliseconds or RFC 3339"


def refusal(ts: object, skew_ms: int = 0) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        normalize_event({"type": "a", "ts": ts}, NOW, LIMITS, skew_ms)
    return info.value


def test_epoch_seconds_are_told_that_milliseconds_are_expected() -> None:
    err = refusal(1_795_600_000)  # NOW in seconds
    assert err.reason == "ts_late"
    assert str(err) == (
        "ts 1795600000 is 1970-01-21T18:46:40Z as epoch milliseconds, older than the lateness window"
        f" (604800 s, starts {START}): did you send seconds? ts takes epoch milliseconds or RFC 3339"
    )


def test_the_seconds_hint_needs_the_value_to_be_accepted_as_seconds() -> None:
    start_s, end_s = (NOW - LIMITS.lateness_ms) // 1000, (NOW + LIMITS.future_ms) // 1000
    assert str(refusal(start_s)).endswith(SECONDS_HINT)  # exactly the window's start, as seconds
    assert str(refusal(end_s)).endswith(SECONDS_HINT)  # exactly its end
    assert str(refusal(start_s - 1)) == (
        f"ts {start_s - 1} is 1970-01-21T18:36:35.199Z, older than the lateness window (604800 s, starts {START})"
    )
    assert SECONDS_HINT not in str(refusal(end_s + 1))
    assert str(refusal(100)) == (
        f"ts 100 is 1970-01-01T00:00:00.100Z, older than the lateness window (604800 s, starts {START})"
    )


def test_an_old_millisecond_ts_shows_its_time_and_the_window_start_without_the_hint() -> None:
    err = refusal(1_700_000_000_000)
    assert err.reason == "ts_late"
    assert str(err) == (
        f"ts 1700000000000 is 2023-11-14T22:13:20Z, older than the lateness window (604800 s, starts {START})"
    )


def test_an_old_rfc3339_ts_is_quoted_and_shown_in_utc() -> None:
    assert str(refusal("2020-01-01T01:00:00.250+01:00")) == (
        "ts '2020-01-01T01:00:00.250+01:00' is 2020-01-01T00:00:00.250Z,"
        f" older than the lateness window (604800 s, starts {START})"
    )


def test_a_future_ts_shows_its_time_and_the_window_end() -> None:
    err = refusal(NOW + 3_600_000)
    assert err.reason == "ts_future"
    assert (
        str(err) == f"ts 1795603600000 is 2026-11-25T10:46:40Z, more than 300 s in the future (the window ends {END})"
    )
    assert str(refusal(10**17)) == (
        f"ts 100000000000000000 is after year 9999, more than 300 s in the future (the window ends {END})"
    )


def test_the_time_shown_is_the_one_judged_after_the_sent_at_correction() -> None:
    # sent_at 10 s behind the server's clock: every ts is moved 10 s later before it is judged.
    assert str(refusal(1_700_000_000_000, skew_ms=10_000)) == (
        "ts 1700000000000 is 2023-11-14T22:13:30Z after the sent_at correction,"
        f" older than the lateness window (604800 s, starts {START})"
    )
    assert str(refusal(1_795_600_000, skew_ms=10_000)) == (
        "ts 1795600000 is 1970-01-21T18:46:50Z as epoch milliseconds after the sent_at correction,"
        f" older than the lateness window (604800 s, starts {START}){SECONDS_HINT}"
    )
    assert str(refusal("2026-11-25T09:46:40Z", skew_ms=3_600_000)) == (
        "ts '2026-11-25T09:46:40Z' is 2026-11-25T10:46:40Z after the sent_at correction,"
        f" more than 300 s in the future (the window ends {END})"
    )


def bad_request(body: bytes) -> str:
    with pytest.raises(BadRequest) as info:
        parse_batch(body, "application/json", max_events=10)
    return str(info.value.detail)


WRAP = '; to send one event, wrap it in [...] or {"events": [...]}'


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"type": "signup"}', f"unknown top-level field(s): type{WRAP}"),
        (
            b'{"type": "signup", "ts": 1, "user_id": "u", "sent_at": 1}',
            f"unknown top-level field(s): ts, type, user_id{WRAP}",
        ),
        (b'{"event_id": "x", "colour": 1}', f"unknown top-level field(s): colour, event_id{WRAP}"),
    ],
)
def test_a_bare_event_object_is_told_to_wrap_it(body: bytes, detail: str) -> None:
    assert bad_request(body) == detail


def test_the_wrap_hint_is_only_for_a_body_without_events_holding_an_event_field() -> None:
    assert bad_request(b'{"source": "web"}') == f"unknown top-level field(s): source{WRAP}"
    assert bad_request(b'{"colour": 1}') == "unknown top-level field(s): colour"
    assert bad_request(b'{"events": [], "source": "web"}') == "unknown top-level field(s): source"
