"""Cache policy: TTLs by range closure, freshness phases, entry codec, validators."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from query.cache_policy import (
    Entry,
    Ttl,
    cache_key,
    etag_for,
    etag_matches,
    forces_refresh,
    lock_key,
    pack,
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


def test_pack_unpack_keeps_body_bytes() -> None:
    body = b'{"data":[{"n":1.50}]}\n\xff'
    entry = Entry(body, "application/json", etag_for(body), 1_234.5, "cur", 1, Ttl(5, 60), query_ms=2.5, total=7)
    assert unpack(pack(entry)) == entry
    untotalled = Entry(body, "text/csv", etag_for(body), 1.0, None, 0, Ttl(5, 0))
    assert unpack(pack(untotalled)) == untotalled
    assert unpack(b"garbage") is None
    assert unpack(b'{"ct":1}\nbody') is None


def test_keys() -> None:
    key = cache_key("tally:", b"[1]")
    assert key.startswith("tally:q2:") and len(key) == len("tally:q2:") + 40
    assert cache_key("tally:", b"[2]") != key
    assert lock_key(key) == key + ":lock"


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
