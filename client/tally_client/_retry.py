"""What to do with an answer: success, retry (after how long) or give up. Pure: the caller passes
the time and the random source."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from tally_client._options import Options

# 408 body timeout, 409 the same key still in flight, 429 rate, 5xx (503 overloaded or Kafka down).
RETRYABLE = frozenset({408, 409, 425, 429})


class Verdict(enum.Enum):
    DELIVERED = "delivered"  # 2xx: the accepted events are durable; `rejected` may list some
    REJECTED = "rejected"  # 422 with per-event errors: no event was valid
    RETRY = "retry"
    FAIL = "fail"  # a refusal a retry cannot change (400, 401, 403, 404, 413, 415, other 4xx)


def classify(status: int | None) -> Verdict:
    """`status` None is a network error (no answer, or the connection was cut)."""
    if status is None or status in RETRYABLE or 500 <= status <= 599:
        return Verdict.RETRY
    if 200 <= status <= 299:
        return Verdict.DELIVERED
    if status == 422:
        return Verdict.REJECTED
    return Verdict.FAIL


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` in seconds: delay-seconds or an HTTP-date (RFC 9110); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def backoff(retry: int, options: Options, rand: random.Random | None = None) -> float:
    """The wait before retry number `retry` (1-based): exponential from `backoff_base`, capped at
    `backoff_max`, jittered into [half, all] of it so that many clients do not retry in step."""
    ceiling = min(options.backoff_max, options.backoff_base * 2.0 ** min(retry - 1, 62))
    r = (rand or random).random()
    return ceiling / 2 + ceiling / 2 * r


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    delay: float = 0.0  # for RETRY
    reason: str = ""  # for FAIL, and for a RETRY turned into a FAIL (retries exhausted)
    exhausted: bool = False  # a FAIL only because the retries are spent (the server may take it later)


def decide(
    status: int | None,
    retry_after: float | None,
    *,
    retries_done: int,
    first_attempt_at: float,
    now: float,
    options: Options,
    what: str,
    rand: random.Random | None = None,
) -> Decision:
    """The next step for a batch after an attempt that ended with `status` (None: network error,
    described by `what`). A retry waits at least the server's Retry-After; a batch whose retries
    are spent, or whose next attempt would start past `max_retry_seconds`, is given up."""
    verdict = classify(status)
    if verdict is not Verdict.RETRY:
        return Decision(verdict, reason=what if verdict is Verdict.FAIL else "")
    if retries_done >= options.max_retries:
        return Decision(
            Verdict.FAIL, reason=f"{what}; gave up after {retries_done} retries (max_retries)", exhausted=True
        )
    delay = backoff(retries_done + 1, options, rand)
    if retry_after is not None:
        delay = max(delay, retry_after)
    if now + delay - first_attempt_at > options.max_retry_seconds:
        spent = now - first_attempt_at
        return Decision(
            Verdict.FAIL,
            reason=f"{what}; gave up after {retries_done} retries in {spent:.1f} s "
            f"(the next in {delay:.1f} s would pass max_retry_seconds={options.max_retry_seconds:g})",
            exhausted=True,
        )
    return Decision(Verdict.RETRY, delay=delay)
