"""query.local_cache's bookkeeping (no I/O: the subscription is not started, `listening` is set
by hand): what may be kept, what an announcement drops, and the byte bound."""

from __future__ import annotations

from redis.asyncio import Redis

from query.cache_policy import Entry, Ttl, etag_for
from query.local_cache import LocalTier

OPEN = Ttl(fresh=5, stale=60, versioned=60, refresh=0.25)


def entry(body: bytes = b'{"data":[]}', at: float = 1_000.0, version: int | None = 3) -> Entry:
    return Entry(body, "application/json", etag_for(body), at, None, 0, OPEN, version=version)


def tier(max_bytes: int = 1 << 20) -> LocalTier:
    local = LocalTier(Redis(), "t:", max_bytes=max_bytes)  # never connects: the subscription is not started
    local.listening = True
    return local


def test_kept_while_fresh_against_the_version_it_was_read_with() -> None:
    local = tier()
    local.keep("k", "r", entry(), 3, local.mark("r"))
    assert local.get("k", 1_030.0) == entry()  # no announcement since: fresh up to `versioned`
    assert local.get("k", 1_060.0) is None  # past it: ask Redis
    assert local.stats()[0] == 0
    moved = tier()
    moved.keep("k", "r", entry(), 4, moved.mark("r"))  # read when the version had already moved
    assert moved.get("k", 1_000.2) is not None and moved.get("k", 1_000.3) is None  # `refresh`, not `versioned`


def test_an_announcement_drops_its_rollups_entries_and_what_was_read_before_it() -> None:
    local = tier()
    local.keep("a", "r", entry(), 3, local.mark("r"))
    local.keep("b", "other", entry(), 3, local.mark("other"))
    before = local.mark("r")  # a read of rollup r starts ...
    local.changed(["r"])  # ... a commit of r is announced ...
    local.keep("c", "r", entry(), 3, before)  # ... so what that read returns is not kept
    assert local.get("a", 1_001.0) is None
    assert local.get("c", 1_001.0) is None
    assert local.get("b", 1_001.0) is not None  # other rollups are untouched


def test_nothing_is_served_or_kept_while_not_listening() -> None:
    local = tier()
    local.keep("a", "r", entry(), 3, local.mark("r"))
    mark = local.mark("r")
    local.listening = False
    assert local.get("a", 1_001.0) is None
    local.keep("b", "r", entry(), 3, mark)
    local.listening = True
    assert local.get("b", 1_001.0) is None


def test_bounded_in_bytes_oldest_first() -> None:
    body = b"x" * 1_000
    local = tier(max_bytes=10_000)
    for i in range(20):
        local.keep(f"k{i}", "r", entry(body), 3, local.mark("r"))
    entries, size = local.stats()
    assert size <= 10_000 and entries == 8
    assert local.get("k0", 1_001.0) is None and local.get("k19", 1_001.0) is not None
    local.keep("huge", "r", entry(b"y" * 5_000), 3, local.mark("r"))  # over an eighth of the bound: not kept
    assert local.get("huge", 1_001.0) is None


def test_closed_ranges_need_no_announcements() -> None:
    closed = Entry(b"{}", "application/json", etag_for(b"{}"), 1_000.0, None, 0, Ttl(fresh=3_600, stale=0), version=3)
    local = tier()
    mark = local.mark("r")
    local.changed(["r"])
    local.keep("closed", "r", closed, 3, mark)  # kept although a commit was announced since the mark
    local.keep("open", "r", entry(), 3, local.mark("r"))
    local.changed(["r"])
    assert local.get("closed", 1_001.0) == closed and local.get("open", 1_001.0) is None
    local._forget_all()  # the subscription dropped
    assert local.get("closed", 1_001.0) == closed  # still served: it cannot change
