"""Fresh cache entries kept in the process too, dropped the moment a commit changes their rollup.

A hit from Redis is two network round trips (the client's and Redis's) and four wake-ups; at a
light load that is most of its latency (p99 ~2.7x a bare Redis GET, docs/performance.md). So
the entries a process has just read or computed fresh are also kept here, bounded in bytes,
and a hit on them makes no round trip at all. What keeps them right is the same signal the
Redis tier follows: consumers publish the names of the rollups each commit changed, right
after bumping their versions (consumers.versions); this process listens, and a rollup named
there loses all its entries here at once (its generation moves, so an entry read before the
message cannot be stored after it). An entry is only served while the subscription is known
to be up: when it drops, everything here is forgotten and nothing is kept until it is back,
because a message may have been missed. Entries that do not follow commits (`Entry.follows_commits`:
closed ranges, and entries on the timer) need none of this: they stay, and are served from here
even while Redis is down. Freshness is judged as in Redis,
against the version the entry was read with (no message since means no commit since).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from core.cache import changes_channel
from query.cache_policy import Entry

log = logging.getLogger(__name__)
PING_SECONDS = 2.0  # how soon a silently dead subscription is noticed (then nothing is served from here)


@dataclass(frozen=True, slots=True)
class _Kept:
    entry: Entry
    rollup: str
    version: int | None  # the rollup's version when the entry was read or computed
    size: int


def subscriber(url: str) -> Redis:
    """A client for the subscription alone, which never reconnects by itself: a reconnect it
    made silently could hide a gap in which announcements were missed."""
    return Redis.from_url(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=0.5)


class LocalTier:
    """The in-process tier: `get` and `keep` for the cache, `listen` as a background task."""

    def __init__(self, redis: Redis, prefix: str, *, max_bytes: int, retry_seconds: float = 1.0) -> None:
        self._redis = redis
        self._channel = changes_channel(prefix)
        self._max_bytes = max_bytes
        self._retry_seconds = retry_seconds
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._keys_of: dict[str, set[str]] = {}  # rollup -> its keys here
        self._bytes = 0
        self._generation: dict[str, int] = {}
        self._epoch = 0  # moves when the subscription drops: nothing read before it may be kept
        self.listening = False
        self._task: asyncio.Task[None] | None = None

    # -- The cache's side ------------------------------------------------------------------------

    def get(self, key: str, now: float) -> Entry | None:
        """The entry under `key` if it is here and fresh, else None (ask Redis)."""
        kept = self._kept.get(key)
        if kept is None or (kept.entry.follows_commits and not self.listening):
            return None
        if kept.entry.freshness(now, kept.version) != "fresh":
            self._drop(key)
            return None
        return kept.entry

    def mark(self, rollup: str) -> tuple[int, int]:
        """Taken before reading Redis or computing: `keep` stores the result only if no commit
        of `rollup` was announced (and the subscription did not drop) in between."""
        return self._epoch, self._generation.get(rollup, 0)

    def keep(self, key: str, rollup: str, entry: Entry, version: int | None, mark: tuple[int, int]) -> None:
        if entry.follows_commits and (not self.listening or mark != self.mark(rollup)):
            return
        size = len(entry.body) + len(key) + 200
        if size > self._max_bytes // 8:  # one large export-sized answer must not push out everything
            return
        self._drop(key)
        self._kept[key] = _Kept(entry, rollup, version, size)
        self._keys_of.setdefault(rollup, set()).add(key)
        self._bytes += size
        while self._bytes > self._max_bytes and self._kept:
            self._drop(next(iter(self._kept)))

    def _drop(self, key: str) -> None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            self._bytes -= kept.size
            keys = self._keys_of.get(kept.rollup)
            if keys is not None:
                keys.discard(key)

    def changed(self, rollups: list[str]) -> None:
        """A commit changed these rollups: their entries that follow commits are no longer known fresh."""
        for rollup in rollups:
            self._generation[rollup] = self._generation.get(rollup, 0) + 1
            for key in list(self._keys_of.get(rollup, ())):
                if self._kept[key].entry.follows_commits:
                    self._drop(key)

    def _forget_all(self) -> None:
        """The subscription dropped: what follows commits goes (an announcement may be missed)."""
        self.listening = False
        self._epoch += 1
        for key in [k for k, kept in self._kept.items() if kept.entry.follows_commits]:
            self._drop(key)

    # -- The subscription --------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="tally-cache-changes")

    async def _listen(self) -> None:
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                await self._follow(pubsub)
            except (RedisError, OSError, TimeoutError) as exc:
                if self.listening:
                    log.warning("cache change subscription lost (%s); serving from Redis until it is back", exc)
            finally:
                self._forget_all()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(self._retry_seconds)

    async def _follow(self, pubsub: PubSub) -> None:
        """Apply announcements; PING every `PING_SECONDS` and give up when a PONG is late, so a
        connection that died silently is noticed within seconds, not at the entries' last bound."""
        awaiting_pong_since: float | None = None
        next_ping = time.monotonic() + PING_SECONDS
        while True:
            message = await pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if message is not None:
                kind = message["type"]
                if kind == "subscribe":
                    # (Re)subscribed: from here on no commit goes unannounced; what is kept from
                    # before may have missed one, so it goes.
                    self._forget_all()
                    self.listening = True
                elif kind == "message":
                    self.changed(message["data"].decode().split())
                elif kind == "pong":
                    awaiting_pong_since = None
            if awaiting_pong_since is not None and now - awaiting_pong_since > PING_SECONDS:
                raise TimeoutError(f"no PONG within {PING_SECONDS:g} s")
            if now >= next_ping:
                await pubsub.ping()
                if awaiting_pong_since is None:
                    awaiting_pong_since = now
                next_ping = now + PING_SECONDS

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._redis.aclose()

    def stats(self) -> tuple[int, int]:
        """(entries, bytes) kept."""
        return len(self._kept), self._bytes
