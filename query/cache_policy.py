"""What the query cache stores, under which key, and for how long. Pure.

A range that ends before `now - lateness` can no longer change (late events are
refused at ingest), so its answer is immutable and cached long. An open range
follows commits: consumers bump a per-rollup version in Redis after each commit
(`version_key`), an entry remembers the version it was computed at, and it stays
fresh until that version moves; then it is served stale while one worker refreshes
it. Two bounds keep this safe and cheap: an entry is refreshed at most every
`refresh` seconds while commits keep coming, and never served fresh for longer than
`versioned` seconds (a lost bump costs that much staleness, no more). An entry
computed while no version was known (no consumer has bumped one) is fresh for
`fresh` seconds, as on a timer.

A stored entry is `orjson(header) + b"\\n" + body`, so a hit returns the body
bytes as they were rendered, without parsing or re-serializing them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import orjson

Freshness = Literal["fresh", "stale", "expired"]


@dataclass(frozen=True, slots=True)
class Ttl:
    """How long an entry is fresh, then stale. `versioned` and `refresh` apply to open ranges
    computed at a known version (see the module docstring); a closed range has `stale == 0`."""

    fresh: float
    stale: float
    versioned: float = 0.0
    refresh: float = 0.0

    @property
    def expire_ms(self) -> int:
        return max(1, int((max(self.fresh, self.versioned) + self.stale) * 1000))


def ttl_for(
    end: datetime,
    now: datetime,
    *,
    lateness_seconds: float,
    fresh: float,
    stale: float,
    closed_fresh: float,
    versioned: float = 0.0,
    refresh: float = 0.0,
) -> Ttl:
    """Immutable (closed) ranges: long fresh, no stale phase. Open ranges: fresh while their
    rollup's version holds (or briefly, without one), then stale."""
    if end <= now - timedelta(seconds=lateness_seconds):
        return Ttl(fresh=closed_fresh, stale=0.0)
    return Ttl(fresh=fresh, stale=stale, versioned=versioned, refresh=refresh)


# Bump when the rendered bytes change shape, so a rolling deploy never serves old-format bodies.
FORMAT_VERSION = 3


def cache_key(prefix: str, identity: bytes) -> str:
    return f"{prefix}q{FORMAT_VERSION}:{hashlib.sha256(identity).hexdigest()[:40]}"


def parse_version(raw: object) -> int | None:
    """A stored counter (Redis answers bytes), or None when absent or unreadable."""
    if isinstance(raw, bytes) and raw.isdigit():
        return int(raw)
    return None


def lock_key(key: str) -> str:
    return f"{key}:lock"


@dataclass(frozen=True, slots=True)
class Entry:
    """A rendered response and what is needed to serve it again: validators, age, paging."""

    body: bytes
    media_type: str
    etag: str
    computed_at: float  # epoch seconds: Age is shared across processes, so wall clock
    next_cursor: str | None
    rows: int
    ttl: Ttl
    query_ms: float = 0.0  # Postgres time when it was computed
    total: int | None = None  # `total=true`
    version: int | None = None  # its rollup's version when the computation started; None: unknown

    def age(self, now: float) -> float:
        return max(0.0, now - self.computed_at)

    @property
    def follows_commits(self) -> bool:
        """An open range computed at a known version: fresh only while that version holds. A closed
        range cannot change, and an entry made before any version existed is on a timer."""
        return self.version is not None and self.ttl.versioned > 0

    def freshness(self, now: float, version: int | None = None) -> Freshness:
        """Fresh, stale or expired at `now`, when the rollup's current version is `version`."""
        age = self.age(now)
        ttl = self.ttl
        if not self.follows_commits:
            fresh = ttl.fresh
        elif version == self.version:
            fresh = ttl.versioned
        else:  # a commit changed the rollup since: refreshed, but not more often than `refresh`
            fresh = min(ttl.refresh, ttl.versioned)
        if age < fresh:
            return "fresh"
        if age < max(ttl.fresh, ttl.versioned) + ttl.stale:
            return "stale"
        return "expired"


def pack(entry: Entry) -> bytes:
    header = {
        "ct": entry.media_type,
        "etag": entry.etag,
        "t": entry.computed_at,
        "nc": entry.next_cursor,
        "rows": entry.rows,
        "fresh": entry.ttl.fresh,
        "stale": entry.ttl.stale,
        "ms": entry.query_ms,
        "total": entry.total,
        "ver": entry.ttl.versioned,
        "ref": entry.ttl.refresh,
        "v": entry.version,
    }
    return orjson.dumps(header) + b"\n" + entry.body


def unpack(raw: bytes) -> Entry | None:
    """The stored entry, or None for anything unreadable (treated as a miss, never an error)."""
    head, sep, body = raw.partition(b"\n")
    if not sep:
        return None
    try:
        h = orjson.loads(head)
        return Entry(
            body=body,
            media_type=str(h["ct"]),
            etag=str(h["etag"]),
            computed_at=float(h["t"]),
            next_cursor=h["nc"],
            rows=int(h["rows"]),
            ttl=Ttl(float(h["fresh"]), float(h["stale"]), float(h["ver"]), float(h["ref"])),
            query_ms=float(h["ms"]),
            total=None if h["total"] is None else int(h["total"]),
            version=None if h["v"] is None else int(h["v"]),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def etag_for(body: bytes) -> str:
    """A weak validator over the rendered data: served bodies also carry per-response
    meta (cache outcome, age), so they are equivalent, not byte-identical."""
    return f'W/"{hashlib.sha256(body).hexdigest()[:32]}"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 If-None-Match: weak comparison over a list, or `*`."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    wanted = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == wanted for tag in if_none_match.split(","))


def forces_refresh(cache_control: str | None) -> bool:
    """A request `Cache-Control: no-cache` asks for an answer not served from cache."""
    if not cache_control:
        return False
    return any(d.strip().split("=")[0].lower() == "no-cache" for d in cache_control.split(","))
