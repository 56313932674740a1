"""Cache policy: TTLs by range closure, freshness phases, entry codec, validators."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.cache import version_key
from query.cache_policy import (
    Entry,
    Ttl,
    cache_key,
    etag_for,
    etag_matches,
    forces_refresh,
    lock_key,
    pack,
    parse_version,
    ttl_for,
    unpack,
)

NOW = datetime(2026, 11, 25, 13, 0, tzinfo=UTC)
LATENESS = 7 * 86_400


def ttl(end: datetime) -> Ttl:
    return ttl_for(end, NOW, lateness_seconds=LATENESS, fresh=5, stale=60, closed_fresh=3_600)


def test_closed_ranges_are_immutable_and_cached_long() -> None:
    assert ttl(NOW - timedelta(days=8)) == Ttl(fresh=3_600, stale=0)
    assert ttl(NOW - timedelta(seconds=LATENESS)) == Ttl(fresh=3_600, stale=0)  # exactly at the edge


def test_open_ranges_are_fresh_briefly_then_stale() -> None:
    assert ttl(NOW - timedelta(seconds=LATENESS - 1)) == Ttl(fresh=5, stale=60)
    assert ttl(NOW + timedelta(hours=1)) == Ttl(fresh=5, stale=60)
    assert Ttl(5, 60).expire_ms == 65_000
    assert Ttl(0, 0).expire_ms == 1


def test_freshness_phases() -> None:
    entry = Entry(b"{}", "application/json", etag_for(b"{}"), computed_at=1_000.0, next_cursor=None, rows=0,
                  ttl=Ttl(5, 60))
    assert entry.freshness(1_004.9) == "fresh"
    assert entry.freshness(1_005.0) == "stale"
    assert entry.freshness(1_064.9) == "stale"
    assert entry.freshness(1_065.0) == "expired"
    assert entry.age(999.0) == 0.0  # clock skew never gives a negative Age


def test_open_ranges_follow_their_rollups_version() -> None:
    """Fresh while the version it was computed at holds (up to `versioned`); once a commit moved
    it, fresh only until `refresh` old, then stale (served, refreshed once)."""
    open_ttl = ttl_for(NOW, NOW, lateness_seconds=LATENESS, fresh=5, stale=60, closed_fresh=3_600, versioned=60,
                       refresh=0.25)
    assert open_ttl == Ttl(fresh=5, stale=60, versioned=60, refresh=0.25)
    assert open_ttl.expire_ms == 120_000
    entry = Entry(b"{}", "application/json", etag_for(b"{}"), 1_000.0, None, 0, open_ttl, version=7)
    assert entry.freshness(1_030.0, 7) == "fresh"  # no commit since: fresh well past the 5 s timer
    assert entry.freshness(1_060.0, 7) == "stale"  # the bound on a lost bump
    assert entry.freshness(1_000.2, 8) == "fresh"  # a commit, but refreshed at most every 0.25 s
    assert entry.freshness(1_000.25, 8) == "stale"
    assert entry.freshness(1_000.25, None) == "stale"  # the counter is gone (Redis flushed): not trusted
    assert entry.freshness(1_120.0, 8) == "expired"
    unversioned = Entry(b"{}", "application/json", etag_for(b"{}"), 1_000.0, None, 0, open_ttl, version=None)
    assert unversioned.freshness(1_004.9, 8) == "fresh"  # computed before any bump: the timer
    assert unversioned.freshness(1_005.0, 8) == "stale"
    closed_ttl = ttl(NOW - timedelta(days=8))
    closed = Entry(b"{}", "application/json", etag_for(b"{}"), 1_000.0, None, 0, closed_ttl, version=7)
    assert closed.freshness(3_000.0, 9) == "fresh"  # a closed range cannot change: versions do not matter


def test_pack_unpack_keeps_body_bytes() -> None:
    body = b'{"data":[{"n":1.50}]}\n\xff'
    entry = Entry(body, "application/json", etag_for(body), 1_234.5, "cur", 1, Ttl(5, 60), query_ms=2.5, total=7)
    assert unpack(pack(entry)) == entry
    untotalled = Entry(body, "text/csv", etag_for(body), 1.0, None, 0, Ttl(5, 0))
    versioned = Entry(body, "application/json", etag_for(body), 1.0, None, 0, Ttl(5, 60, 60, 0.25), version=3)
    assert unpack(pack(versioned)) == versioned
    assert unpack(pack(untotalled)) == untotalled
    assert unpack(b"garbage") is None
    assert unpack(b'{"ct":1}\nbody') is None


def test_keys() -> None:
    key = cache_key("tally:", b"[1]")
    assert key.startswith("tally:q3:") and len(key) == len("tally:q3:") + 40
    assert cache_key("tally:", b"[2]") != key
    assert lock_key(key) == key + ":lock"
    assert version_key("tally:", "events_by_type") == "tally:v:events_by_type"
    assert parse_version(b"17") == 17
    assert parse_version(None) is None
    assert parse_version(b"x") is None


def test_etag_matching() -> None:
    tag = etag_for(b"x")
    assert tag.startswith('W/"') and tag.endswith('"') and len(tag) == 36  # weak: meta differs per response
    assert etag_for(b"y") != tag
    assert etag_matches(tag, tag)
    assert etag_matches(f'"other", {tag.removeprefix("W/")}', tag)
    assert etag_matches("*", tag)
    assert not etag_matches('"other"', tag)
    assert not etag_matches(None, tag)


def test_no_cache_directive() -> None:
    assert forces_refresh("no-cache")
    assert forces_refresh("max-age=0, No-Cache")
    assert not forces_refresh("max-age=60")
    assert not forces_refresh(None)
