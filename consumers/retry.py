"""Retry with backoff for work that must eventually happen (a batch is never skipped).

A Postgres or Kafka restart, a deadlock or a serialization failure is waited out,
not fatal. Any other error is a bug or a broken deployment and is raised, so the
process stops loudly instead of spinning. When a stop is requested the retries
get a short grace period, then `Stopped` is raised: that is safe because nothing
of the batch was committed, and the next owner of the partition redoes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka.errors import KafkaError
from sqlalchemy import exc as sa_exc

from core.db import exception_chain

log = logging.getLogger(__name__)
T = TypeVar("T")

FIRST_DELAY = 0.1
MAX_DELAY = 5.0
STOP_GRACE = 5.0
# Serialization failure, deadlock, lock timeout, too many connections, server shutting down or starting.
_TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "53300", "57P01", "57P02", "57P03"})
_TRANSIENT_TYPES = (OSError, TimeoutError, sa_exc.TimeoutError)
# asyncpg's "connection lost" errors (no stubs to import them by type); class 08 ones carry a sqlstate.
_TRANSIENT_NAMES = frozenset({"ConnectionDoesNotExistError", "ConnectionFailureError", "PostgresConnectionError"})


class Stopped(Exception):
    """A stop was requested while work was still failing; the work was not done (and not committed)."""


def postgres_transient(exc: BaseException) -> bool:
    """Worth retrying: the connection broke, the server restarts, or a deadlock/serialization failure."""
    for cause in exception_chain(exc):
        if isinstance(cause, sa_exc.DBAPIError) and cause.connection_invalidated:
            return True
        if isinstance(cause, _TRANSIENT_TYPES) or type(cause).__name__ in _TRANSIENT_NAMES:
            return True
        state = getattr(cause, "sqlstate", None)
        if isinstance(state, str) and (state in _TRANSIENT_SQLSTATES or state.startswith("08")):
            return True
    return False


def kafka_transient(exc: BaseException) -> bool:
    """Worth retrying: any broker or connection error (the broker may be restarting)."""
    return isinstance(exc, KafkaError | OSError | TimeoutError)


async def wait_or_stop(stop: asyncio.Event | None, seconds: float) -> None:
    """Sleep `seconds`, waking early if `stop` is set."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def jittered(delay: float) -> float:
    return delay * (0.5 + random.random())  # noqa: S311 - jitter, not cryptography


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    transient: Callable[[BaseException], bool],
    stop: asyncio.Event | None = None,
) -> T:
    """`await op()` until it succeeds; raise at once on a non-transient error."""
    delay = FIRST_DELAY
    stop_seen: float | None = None
    attempt = 0
    while True:
        attempt += 1
        try:
            return await op()
        except Exception as exc:
            if not transient(exc):
                raise
            if stop is not None and stop.is_set():
                stop_seen = stop_seen or time.monotonic()
                if time.monotonic() - stop_seen >= STOP_GRACE:
                    raise Stopped(f"{what}: gave up on stop after {attempt} attempts") from exc
            log.warning(
                "%s failed (attempt %d: %s: %s); retrying in %.1f s",
                what,
                attempt,
                type(exc).__name__,
                str(exc)[:200],
                delay,
            )
            await wait_or_stop(None if stop_seen else stop, jittered(delay))
            delay = min(delay * 2, MAX_DELAY)
