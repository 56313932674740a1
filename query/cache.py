"""Redis stale-while-revalidate cache with single-flight computation (the cache's I/O).

One round trip reads an entry and its rollup's version (an MGET); `query.cache_policy`
decides from both whether the entry is fresh.

- fresh entry: served as stored bytes (`hit`);
- stale entry: served at once, refreshed in the background by one worker
  (a Redis `SET NX` lock across processes, a set of keys within one) (`stale`);
- miss: identical concurrent requests in a process share one task; across
  processes a `SET NX` lock elects one computer and the others poll briefly for
  its value (`miss` for the computer, `coalesced` for those who waited);
- Redis down or slow: answer from Postgres (`bypass`) and stop trying Redis for a
  moment (a small circuit breaker), so a dead Redis costs one timeout, not one
  per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Literal, TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core import metrics
from core.redis_read import RedisReader
from query.cache_policy import Entry, lock_key, pack, parse_version, unpack
from query.local_cache import LocalTier

log = logging.getLogger(__name__)

Outcome = Literal["hit", "stale", "miss", "coalesced", "bypass"]
Reason = Literal["miss", "refresh", "bypass"]
Compute = Callable[[Reason], Awaitable[Entry]]  # the entry, its version left for the cache to set
Keep = Callable[[Entry, int | None], None]  # hands a fresh entry and its version to the local tier
T = TypeVar("T")

_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class RedisDown(Exception):
    """Redis failed or was too slow for one operation; callers fall back to Postgres."""


class QueryCache:
    def __init__(
        self,
        redis: Redis,
        *,
        lock_ttl_ms: int,
        op_timeout: float = 1.0,
        breaker_seconds: float = 2.0,
        reader: RedisReader | None = None,
        local: LocalTier | None = None,
    ) -> None:
        self._redis = redis
        self._local = local  # fresh entries kept in the process too (query.local_cache)
        self._reader = reader  # the hit's one read, pipelined (core.redis_read); redis-py without it
        self._lock_ttl_ms = lock_ttl_ms
        self._op_timeout = op_timeout
        self._breaker_seconds = breaker_seconds
        self._down_until = 0.0
        self._inflight: dict[str, asyncio.Task[tuple[Entry, bool]]] = {}
        self._refreshing: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._release = redis.register_script(_RELEASE)

    # -- Redis operations, each bounded and turned into RedisDown on failure ------------------

    async def _op(self, call: Awaitable[T], *, bounded: bool = False) -> T:
        """`call`'s result; RedisDown if it fails or takes over op_timeout (unless `bounded` already)."""
        try:
            if bounded:
                return await call
            async with asyncio.timeout(self._op_timeout):  # not wait_for: no task per operation
                return await call
        except (RedisError, OSError, TimeoutError) as exc:
            self._down_until = time.monotonic() + self._breaker_seconds
            raise RedisDown(str(exc)) from exc

    @property
    def local(self) -> LocalTier | None:
        return self._local

    def redis_usable(self) -> bool:
        return time.monotonic() >= self._down_until

    async def _read(self, key: str) -> Entry | None:
        raw = await self._op(self._redis.get(key))
        return unpack(raw) if isinstance(raw, bytes) else None

    async def _read_versioned(self, key: str, version_key: str) -> tuple[Entry | None, int | None]:
        """The entry under `key` and the current version of its rollup, in one round trip."""
        if self._reader is None:
            raw, version = await self._op(self._redis.mget(key, version_key))
        else:  # the reader bounds its own wait (and aborts the connection when it expires)
            raw, version = await self._op(self._reader.mget(key, version_key), bounded=True)
        return (unpack(raw) if isinstance(raw, bytes) else None), parse_version(version)

    async def _store(self, key: str, entry: Entry) -> None:
        with contextlib.suppress(RedisDown):
            await self._op(self._redis.set(key, pack(entry), px=entry.ttl.expire_ms))

    async def _lock(self, key: str) -> str | None:
        """The lock token if this worker won the key, None if another holds it."""
        token = uuid.uuid4().hex
        won = await self._op(self._redis.set(lock_key(key), token, nx=True, px=self._lock_ttl_ms))
        return token if won else None

    async def _unlock(self, key: str, token: str) -> None:
        with contextlib.suppress(RedisDown):
            await self._op(self._release(keys=[lock_key(key)], args=[token]))

    # -- The protocol ----------------------------------------------------------------------------

    async def fetch(
        self, key: str, version_key: str, compute: Compute, *, force: bool = False, rollup: str = ""
    ) -> tuple[Entry, Outcome]:
        """The entry for `key` and how it was obtained; `version_key` names its rollup's version.
        `force` serves nothing stored (Cache-Control: no-cache)."""
        local = self._local
        if local is not None and not force:
            kept = local.get(key, time.time())
            if kept is not None:
                return kept, "hit"
        keep = self._keeper(key, rollup)
        if not self.redis_usable():
            return await self._single_flight(key, compute, None, use_redis=False, not_before=0.0)
        started = time.time()
        try:
            entry, version = await self._read_versioned(key, version_key)
        except RedisDown:
            return await self._single_flight(key, compute, None, use_redis=False, not_before=0.0)
        if entry is not None and not force:
            freshness = entry.freshness(time.time(), version)
            if freshness == "fresh":
                if keep is not None:
                    keep(entry, version)
                return entry, "hit"
            if freshness == "stale":
                self._refresh_later(key, compute, version, keep)
                return entry, "stale"
        return await self._single_flight(
            key, compute, version, use_redis=True, not_before=started if force else 0.0, keep=keep
        )

    def _keeper(self, key: str, rollup: str) -> Keep | None:
        """How to hand what is read or computed now to the local tier: only if no commit of
        `rollup` is announced meanwhile (the mark is taken before Redis is read)."""
        local = self._local
        if local is None or not rollup:
            return None
        mark = local.mark(rollup)
        return lambda entry, version: local.keep(key, rollup, entry, version, mark)

    async def _single_flight(
        self,
        key: str,
        compute: Compute,
        version: int | None,
        *,
        use_redis: bool,
        not_before: float,
        keep: Keep | None = None,
    ) -> tuple[Entry, Outcome]:
        task = self._inflight.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.create_task(self._compute_once(key, compute, version, use_redis, not_before, keep))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        # shield: a cancelled request must not cancel the computation others are waiting for.
        entry, computed = await asyncio.shield(task)
        if not use_redis:
            return entry, "bypass"
        return entry, "miss" if computed and not joined else "coalesced"

    def _forget(self, key: str, task: asyncio.Task[tuple[Entry, bool]]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved here: the waiters re-raise it; do not log it as lost

    async def _compute_once(
        self, key: str, compute: Compute, version: int | None, use_redis: bool, not_before: float, keep: Keep | None
    ) -> tuple[Entry, bool]:
        """(entry, True) if this worker computed it, (entry, False) if another process did."""
        if not use_redis:
            return await compute("bypass"), True
        try:
            token = await self._lock(key)
        except RedisDown:
            return await compute("bypass"), True
        if token is None:
            theirs = await self._wait_for_other(key, not_before)
            if theirs is not None:
                return theirs, False
        try:
            # The version read before computing: a commit during the computation moves the
            # counter past it, so the next reader refreshes rather than trusting this entry.
            entry = replace(await compute("miss"), version=version)
            await self._store(key, entry)
            if keep is not None:
                keep(entry, version)
            return entry, True
        finally:
            if token is not None:
                await self._unlock(key, token)

    async def _wait_for_other(self, key: str, not_before: float) -> Entry | None:
        """Poll for the value another process is computing; None if it gave up or we timed out."""
        deadline = time.monotonic() + self._lock_ttl_ms / 1000
        pause = 0.01
        with contextlib.suppress(RedisDown):
            while time.monotonic() < deadline:
                await asyncio.sleep(pause)
                pause = min(pause * 1.5, 0.1)
                entry = await self._read(key)
                if entry is not None and entry.computed_at >= not_before and entry.freshness(time.time()) != "expired":
                    return entry
                if not await self._op(self._redis.exists(lock_key(key))):
                    return None  # the holder finished without storing (or failed): compute ourselves
        return None

    def _refresh_later(self, key: str, compute: Compute, version: int | None, keep: Keep | None) -> None:
        if key in self._refreshing or key in self._inflight:
            return
        self._refreshing.add(key)
        task = asyncio.create_task(self._refresh(key, compute, version, keep))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh(self, key: str, compute: Compute, version: int | None, keep: Keep | None) -> None:
        try:
            token = await self._lock(key)
            if token is None:
                return  # another worker is refreshing this key
            try:
                entry = replace(await compute("refresh"), version=version)
                await self._store(key, entry)
                if keep is not None:
                    keep(entry, version)
                metrics.cache_refreshes.inc()
            finally:
                await self._unlock(key, token)
        except RedisDown:
            pass
        except Exception:
            log.exception("background refresh of %s failed; the stale entry stays until it expires", key)
        finally:
            self._refreshing.discard(key)

    async def drain(self) -> None:
        """Let background refreshes finish (bounded), then cancel what is left. For shutdown."""
        pending = set(self._background) | set(self._inflight.values())
        if not pending:
            return
        _, still = await asyncio.wait(pending, timeout=self._lock_ttl_ms / 1000)
        for task in still:
            task.cancel()
        await asyncio.gather(*still, return_exceptions=True)
