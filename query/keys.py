"""From a request's rollup name and query string to the validated query and its cache key. Pure.

A dashboard asks the same few query strings again and again, and validating one (parsing
times, zones, fields, filters, a signed cursor) costs more than the rest of a cache hit.
So the result is remembered per (rollup, query string). The only input besides the
string is the clock, and it reaches the result through one value: the range that the
`from`/`to` expressions align to at `now`. A remembered result is reused while that
range is unchanged and recomputed (revalidated) once it moves, so it is always exactly
what `parse_query` would return now (tests/unit/test_query_keys.py checks this against
`parse_query` itself).

Checking the range is itself a few floor/ceil computations, so within one second it is
skipped: relative times are whole seconds, and every bucket boundary (minutes, hours, local
midnights: zone offsets are whole seconds) falls on a whole second, so an aligned range
cannot change strictly between two whole seconds. Only the instant of a whole second
itself, where a ceiling may move, is checked again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from urllib.parse import parse_qsl

from core.cache import version_key
from query.cache_policy import cache_key
from query.catalog import Catalog, Rollup
from query.cursor import Value, decode
from query.params import Limits, RollupQuery, parse_query
from query.planner import order_kinds
from query.timerange import align

MAX_REMEMBERED = 4_096  # query strings per process; the oldest is forgotten first


@dataclass(frozen=True, slots=True)
class Resolved:
    """A request's validated query, ready to serve: from the cache under `key`, or computed."""

    rollup: Rollup
    query: RollupQuery  # with the cursor's pinned range when it has a cursor
    after: tuple[Value, ...] | None  # the cursor's position: rows strictly after it
    key: str
    version_key: str


class Resolver:
    def __init__(
        self, catalog: Catalog, limits: Limits, *, prefix: str, secret: str, remember: int = MAX_REMEMBERED
    ) -> None:
        self._catalog = catalog
        self._limits = limits
        self._prefix = prefix
        self._secret = secret
        self._remember = remember
        # (name, query string) -> (the query as parsed at some `now`, what it resolved to, and the
        # whole second strictly inside which that `now` fell, or None)
        self._known: dict[tuple[str, str], tuple[RollupQuery, Resolved, int | None]] = {}

    def resolve(self, name: str, query_string: str, now: datetime) -> Resolved:
        """What `name?query_string` asks for at `now`; BadRequest or NotFound naming what is wrong."""
        known = self._known.get((name, query_string))
        stamp = now.timestamp()
        second = int(stamp) if stamp != int(stamp) else None  # None exactly on a whole second
        if known is not None:
            parsed, resolved, checked = known
            if second is not None and second == checked:
                return resolved
            if align(parsed.from_expr, parsed.to_expr, parsed.granularity, now, parsed.tzinfo) == parsed.range:
                self._known[(name, query_string)] = (parsed, resolved, second)
                return resolved
        rollup = self._catalog.get(name)
        parsed = parse_query(rollup.spec, parse_qsl(query_string, keep_blank_values=True), self._limits, now)
        q, after = parsed, None
        if parsed.cursor is not None:
            position = decode(parsed.cursor, parsed.fingerprint(), order_kinds(rollup.spec, parsed.order), self._secret)
            q, after = parsed.with_range(position.range), tuple(position.values)
        key = cache_key(self._prefix, q.identity())
        resolved = Resolved(rollup, q, after, key, version_key(self._prefix, q.rollup))
        if len(self._known) >= self._remember:
            del self._known[next(iter(self._known))]
        self._known[(name, query_string)] = (parsed, resolved, second)
        return resolved
