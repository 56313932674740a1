"""After a batch commits, move the version of each rollup it changed, so cached dashboards refresh.

The query cache keeps an open range's answer fresh while its rollup's version holds
(query.cache_policy); this is what moves it. A bump happens strictly after the commit, so
a refresh it triggers reads what was committed. It never holds up the consumer: bumps run
in one background task that coalesces whatever commits arrived meanwhile into one pipeline
of INCRs, bounded by a timeout. A bump that fails is counted and logged once per outage;
the cache then falls back to its `cache_versioned_fresh_seconds` bound, and exactness in
Postgres is untouched (Redis is never part of the commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core import metrics
from core.cache import changes_channel, version_key

log = logging.getLogger(__name__)


class VersionBumper:
    def __init__(self, redis: Redis, prefix: str, *, timeout: float = 1.0) -> None:
        self._redis = redis
        self._prefix = prefix
        self._timeout = timeout
        self._due: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def committed(self, rollups: Iterable[str]) -> None:
        """Note rollups a commit changed; their versions move soon, without waiting here."""
        self._due.update(rollups)
        if self._due and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._bump_due(), name="tally-version-bump")

    async def _bump_due(self) -> None:
        while self._due:
            names, self._due = sorted(self._due), set()
            try:
                async with asyncio.timeout(self._timeout):
                    pipe = self._redis.pipeline(transaction=False)
                    for name in names:
                        pipe.incr(version_key(self._prefix, name))
                    # After the INCRs, in the same pipeline: a query process that hears it and then
                    # reads a version reads the new one (query.local_cache drops its copies).
                    pipe.publish(changes_channel(self._prefix), " ".join(names))
                    await pipe.execute()
            except (RedisError, OSError, TimeoutError) as exc:
                metrics.version_bump_failures.inc()
                if not self._failing:
                    log.warning(
                        "could not move rollup versions in Redis (%s: %s); cached open ranges refresh on "
                        "their timer until it answers",
                        type(exc).__name__,
                        exc,
                    )
                self._failing = True
                continue
            metrics.version_bumps.inc(len(names))
            if self._failing:
                log.info("rollup versions move in Redis again")
                self._failing = False

    async def close(self) -> None:
        """Let the last bumps go out (bounded), then close the client."""
        task = self._task
        if task is not None:
            await asyncio.wait([task], timeout=self._timeout * 2)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._redis.aclose()
