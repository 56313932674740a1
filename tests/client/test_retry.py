"""Retry classification, backoff, Retry-After (pure)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from tally_client import Options
from tally_client._retry import Verdict, backoff, classify, decide, parse_retry_after


@pytest.mark.parametrize("status", [None, 408, 409, 429, 500, 502, 503, 504])
def test_retried(status: int | None) -> None:
    assert classify(status) is Verdict.RETRY


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 415, 431, 301])
def test_not_retried(status: int) -> None:
    assert classify(status) is Verdict.FAIL


def test_success_and_rejected() -> None:
    assert classify(202) is classify(200) is Verdict.DELIVERED
    assert classify(422) is Verdict.REJECTED


def test_retry_after_forms() -> None:
    now = datetime(2026, 12, 5, 20, 0, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=7), usegmt=True), now) == 7.0
    assert parse_retry_after(format_datetime(now - timedelta(seconds=7), usegmt=True), now) == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-1") is None
    assert parse_retry_after("1.5") is None


def test_backoff_is_jittered_exponential_and_capped() -> None:
    options = Options(backoff_base=0.5, backoff_max=30.0)
    rand = random.Random(1)
    for retry in range(1, 40):
        ceiling = min(30.0, 0.5 * 2 ** (retry - 1))
        samples = [backoff(retry, options, rand) for _ in range(200)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples)
        assert max(samples) - min(samples) > ceiling / 4  # jittered, not in step
    assert backoff(10_000, options, rand) <= 30.0


def decide_now(
    status: int | None,
    retry_after: float | None = None,
    *,
    done: int = 0,
    spent: float = 0.0,
    options: Options | None = None,
) -> tuple[Verdict, float, str]:
    d = decide(
        status,
        retry_after,
        retries_done=done,
        first_attempt_at=100.0,
        now=100.0 + spent,
        options=options or Options(),
        what="HTTP x",
        rand=random.Random(0),
    )
    return d.verdict, d.delay, d.reason


def test_retry_after_is_a_floor() -> None:
    verdict, delay, _ = decide_now(503, 7.0)
    assert verdict is Verdict.RETRY and delay == 7.0
    verdict, delay, _ = decide_now(503, 0.0, done=5)
    assert verdict is Verdict.RETRY and 8.0 <= delay <= 16.0  # the backoff, when larger


def test_gives_up_after_max_retries_or_time() -> None:
    options = Options(max_retries=3, max_retry_seconds=60)
    assert decide_now(None, done=2, options=options)[0] is Verdict.RETRY
    verdict, _, reason = decide_now(None, done=3, options=options)
    assert verdict is Verdict.FAIL and "after 3 retries (max_retries)" in reason
    verdict, _, reason = decide_now(503, 30.0, done=1, spent=40.0, options=options)
    assert verdict is Verdict.FAIL and "max_retry_seconds=60" in reason
    assert decide_now(503, 30.0, done=1, spent=20.0, options=options)[0] is Verdict.RETRY


def test_non_retryable_keeps_its_reason() -> None:
    assert decide_now(400) == (Verdict.FAIL, 0.0, "HTTP x")
    assert decide_now(422)[0] is Verdict.REJECTED
    assert decide_now(202)[0] is Verdict.DELIVERED


def test_options_are_checked() -> None:
    with pytest.raises(ValueError):
        Options(full_policy="wait")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Options(max_batch_events=0)
    with pytest.raises(ValueError):
        Options(backoff_base=2, backoff_max=1)
    with pytest.raises(AttributeError):
        Options().max_retries = 3  # type: ignore[misc]
