"""Waiting for a dependency with backoff instead of crashing at start-up."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


async def retry_until(
    attempt: Callable[[], Awaitable[T]],
    *,
    what: str,
    deadline: float | None = None,
    first_delay: float = 0.2,
    max_delay: float = 5.0,
) -> T:
    """Call `attempt` until it succeeds; give up after `deadline` seconds (None: never)."""
    start = time.monotonic()
    delay = first_delay
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if deadline is not None and time.monotonic() - start + delay > deadline:
                raise
            log.warning("%s not reachable yet (%s: %s); retrying in %.1f s", what, type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
