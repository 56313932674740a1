"""Lag verdicts (Burrow's rules, adapted): every rule and its edges, over hand-made windows."""

from __future__ import annotations

import pytest

from query.lag_verdict import Observation, Status, Window, Windows, evaluate, worst

W = 50.0  # window_seconds: 10 samples 5 s apart


def obs(*rows: tuple[float, int, int]) -> list[Observation]:
    """(time, end_offset, position) rows, oldest first."""
    return [Observation(t, end, pos) for t, end, pos in rows]


def test_lag_is_end_minus_position_never_negative() -> None:
    assert Observation(0, 10, 4).lag == 6
    assert Observation(0, 10, 12).lag == 0  # stored beyond the log end (a new, empty broker log)


def test_empty_window_and_no_current_is_unknown() -> None:
    assert evaluate([], None, None, W) is Status.UNKNOWN
    assert evaluate([], None, 0.0, W) is Status.UNKNOWN


def test_a_single_observation_with_lag_is_ok_unless_idle_past_the_window() -> None:
    one = obs((100, 10, 4))
    assert evaluate(one, None, 90.0, W) is Status.OK  # not enough evidence for STALL or WARN
    assert evaluate([], one[0], 90.0, W) is Status.OK
    assert evaluate(one, None, 49.0, W) is Status.STOP  # idle 51 s > 50 s
    assert evaluate(one, None, None, W) is Status.OK  # idle unknown: STOP cannot be decided


def test_rule1_zero_lag_once_in_the_window_is_ok() -> None:
    # Offsets never moved and the last apply is ancient, but the lag was 0 once: OK beats every error.
    window = obs((0, 5, 5), (5, 8, 5), (10, 12, 5), (15, 20, 5))
    assert evaluate(window, None, -1_000.0, W) is Status.OK
    assert evaluate(obs((0, 5, 5)), None, -1_000.0, W) is Status.OK  # a single observation, lag 0


def test_rule1_zero_current_lag_is_ok_whatever_the_window() -> None:
    window = obs((0, 10, 2), (5, 12, 2), (10, 14, 2))
    current = Observation(11, 14, 14)  # the consumer just caught up
    assert evaluate(window, current, 11.0, W) is Status.OK


def test_rule2_stop_when_nothing_applied_for_longer_than_the_window() -> None:
    window = obs((100, 10, 4), (105, 12, 4), (110, 15, 4))
    assert evaluate(window, None, 110 - W - 0.001, W) is Status.STOP
    assert evaluate(window, None, 110 - W, W) is Status.STALL  # exactly the window: not longer
    # STOP is judged at the current observation's time.
    assert evaluate(window, Observation(161, 15, 4), 110.0, W) is Status.STOP


def test_rule2_stop_comes_before_stall_and_warn() -> None:
    moving = obs((100, 10, 2), (105, 14, 3), (110, 19, 4))  # moves, lag grows every interval
    assert evaluate(moving, None, 108.0, W) is Status.WARN
    assert evaluate(moving, None, 0.0, W) is Status.STOP  # updated_at says otherwise: trust it


def test_rule3_stall_when_the_offset_does_not_move_across_the_window() -> None:
    flat = obs((100, 10, 4), (105, 10, 4))  # two observations are enough; same lag
    assert evaluate(flat, None, 95.0, W) is Status.STALL
    growing = obs((100, 10, 4), (105, 11, 4), (110, 30, 4))
    assert evaluate(growing, None, 95.0, W) is Status.STALL  # not WARN: the offset does not move


def test_rule3_a_move_in_the_current_observation_is_not_a_stall() -> None:
    flat = obs((100, 10, 4), (105, 10, 4))
    assert evaluate(flat, Observation(106, 10, 6), 105.5, W) is Status.OK


def test_rule4_warn_when_the_lag_grows_in_every_interval() -> None:
    window = obs((0, 10, 0), (5, 20, 5), (10, 31, 10), (15, 43, 15))  # lags 10, 15, 21, 28
    assert evaluate(window, None, 15.0, W) is Status.WARN


def test_rule4_one_interval_without_growth_is_ok() -> None:
    flat_once = obs((0, 10, 0), (5, 20, 5), (10, 25, 10), (15, 37, 15))  # lags 10, 15, 15, 22
    assert evaluate(flat_once, None, 15.0, W) is Status.OK
    shrinking = obs((0, 10, 0), (5, 30, 5), (10, 32, 20))  # lags 10, 25, 12
    assert evaluate(shrinking, None, 10.0, W) is Status.OK
    steady = obs((0, 100, 0), (5, 200, 100), (10, 300, 200))  # steady non-zero lag under steady load
    assert evaluate(steady, None, 10.0, W) is Status.OK


def test_rule4_needs_two_observations() -> None:
    assert evaluate(obs((0, 10, 0)), Observation(1, 20, 5), 1.0, W) is Status.OK


def test_a_rewound_offset_is_judged_by_the_same_rules() -> None:
    rewound = obs((0, 10, 8), (5, 12, 3), (10, 15, 4))  # lags 2, 9, 11; moved (backwards, then on)
    assert evaluate(rewound, None, 10.0, W) is Status.WARN


def test_group_verdict_is_the_worst_known_partition() -> None:
    assert worst([Status.OK, Status.WARN, Status.OK]) is Status.WARN
    assert worst([Status.STALL, Status.STOP, Status.WARN]) is Status.STOP
    assert worst([Status.UNKNOWN, Status.OK]) is Status.OK
    assert worst([Status.UNKNOWN, Status.UNKNOWN]) is Status.UNKNOWN
    assert worst([]) is Status.UNKNOWN


def test_gauge_codes_are_stable() -> None:
    assert {s.name: int(s) for s in Status} == {"UNKNOWN": -1, "OK": 0, "WARN": 1, "STALL": 2, "STOP": 3}


def test_window_size() -> None:
    assert Window(10, 5.0).seconds == 50.0
    with pytest.raises(ValueError, match="at least 2"):
        Window(1, 5.0)
    with pytest.raises(ValueError, match="positive"):
        Window(10, 0)


def test_windows_keep_the_last_samples_per_partition() -> None:
    windows = Windows(3)
    assert windows.window(0) == () and windows.filled() == 0
    for t in range(5):
        windows.add(0, Observation(t, 10 + t, 4))
    windows.add(1, Observation(4, 3, 3))
    assert [o.time for o in windows.window(0)] == [2, 3, 4]
    assert windows.partitions() == [0, 1] and windows.filled() == 1


def test_first_seen_is_when_the_current_position_was_first_observed() -> None:
    windows = Windows(2)
    assert windows.first_seen(0, 4, now=7.0) == 7.0  # never seen: now
    windows.add(0, Observation(1, 10, 4))
    windows.add(0, Observation(2, 10, 4))
    windows.add(0, Observation(3, 10, 4))  # the window forgets t=1; first_seen does not
    assert windows.first_seen(0, 4, now=9.0) == 1
    assert windows.first_seen(0, 6, now=9.0) == 9.0  # at another position now: it moved
    windows.add(0, Observation(4, 12, 6))
    assert windows.first_seen(0, 6, now=9.0) == 4


def test_a_partition_never_stored_stops_after_the_window_of_watching() -> None:
    """No stored offset: `applied_at` is when the sampler first saw the position (see LagSampler.judge)."""
    windows = Windows(3)
    for t in (0.0, 0.2, 0.4, 0.6, 0.8):
        windows.add(0, Observation(t, 5, 0))
    since = windows.first_seen(0, 0, now=0.8)
    assert evaluate(windows.window(0), None, since, 0.6) is Status.STOP
    assert evaluate(windows.window(0), None, since, 1.0) is Status.STALL
