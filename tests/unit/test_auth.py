"""The pure parts of API-key auth: key format, parsing, hashing, scopes, the Authorization header, the cache."""

from __future__ import annotations

import base64
import hashlib

import pytest

from core.auth import (
    ANONYMOUS,
    SCOPES,
    AuthError,
    Principal,
    TtlCache,
    bearer_token,
    check_scope,
    format_key,
    has_scope,
    hash_secret,
    new_key_id,
    new_secret,
    parse_key,
    secret_matches,
    validate_scopes,
)
from core.problems import Forbidden


def test_a_new_key_round_trips_through_parse() -> None:
    key_id, secret = new_key_id(), new_secret()
    token = format_key(key_id, secret)
    assert token == f"tally_{key_id}_{secret}"
    assert parse_key(token) == (key_id, secret)


def test_keys_are_random_and_carry_256_bits() -> None:
    secrets_ = {new_secret() for _ in range(200)}
    ids = {new_key_id() for _ in range(200)}
    assert len(secrets_) == 200 and len(ids) == 200
    for secret in secrets_:
        assert len(base64.urlsafe_b64decode(secret + "=")) == 32
        assert set(secret) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert all(len(i) == 12 and set(i) <= set("0123456789abcdef") for i in ids)


def test_a_secret_with_underscores_parses() -> None:
    secret = "_" * 43
    assert parse_key(f"tally_0123456789ab_{secret}") == ("0123456789ab", secret)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "tally",
        "tally_0123456789ab",
        "tally_0123456789ab_",
        "tally_0123456789ab_" + "A" * 42,  # secret too short
        "tally_0123456789ab_" + "A" * 44,  # too long
        "tally_0123456789AB_" + "A" * 43,  # id not lowercase hex
        "tally_0123456789a_" + "A" * 44,  # id too short
        "tally-0123456789ab-" + "A" * 43,
        "other_0123456789ab_" + "A" * 43,
        "tally_0123456789ab_" + "A" * 42 + "=",  # padding / not url-safe base64
        "tally_0123456789ab_" + "A" * 42 + "+",
        " tally_0123456789ab_" + "A" * 43,
        "tally_0123456789ab_" + "A" * 43 + "\n",
    ],
)
def test_malformed_keys_are_refused(token: str) -> None:
    with pytest.raises(AuthError) as caught:
        parse_key(token)
    assert caught.value.reason == "malformed"


def test_hash_is_sha256_of_the_secret_and_compare_is_exact() -> None:
    secret = new_secret()
    stored = hash_secret(secret)
    assert stored == hashlib.sha256(secret.encode()).digest() and len(stored) == 32
    assert secret_matches(secret, stored)
    assert not secret_matches(secret[:-1] + ("A" if secret[-1] != "A" else "B"), stored)
    assert not secret_matches(secret, stored[:-1])
    assert not secret_matches(secret, b"")


def test_admin_implies_every_scope() -> None:
    for scope in SCOPES:
        assert has_scope({"admin"}, scope)
    assert has_scope({"ingest"}, "ingest")
    assert not has_scope({"ingest"}, "query")
    assert not has_scope({"query"}, "ingest")
    assert not has_scope({"query", "ingest"}, "admin")
    assert not has_scope(set(), "query")


def test_check_scope_names_the_missing_scope() -> None:
    check_scope(Principal("k1", "n", frozenset({"admin"})), "query")
    check_scope(ANONYMOUS, "ingest")
    with pytest.raises(Forbidden) as caught:
        check_scope(Principal("k1", "n", frozenset({"ingest"})), "query")
    assert caught.value.status == 403
    assert caught.value.detail is not None and "`query`" in caught.value.detail and "k1" in caught.value.detail
    assert 'scope="query"' in caught.value.headers["WWW-Authenticate"]


def test_validate_scopes() -> None:
    assert validate_scopes(["query", "ingest", "query"]) == ("ingest", "query")
    with pytest.raises(ValueError, match="write"):
        validate_scopes(["ingest", "write"])
    with pytest.raises(ValueError, match="at least one"):
        validate_scopes([])


def test_bearer_header() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer abc") == "abc"
    assert bearer_token("BEARER   abc  ") == "abc"


@pytest.mark.parametrize(("header", "reason"), [(None, "missing"), ("", "missing"), ("   ", "missing")])
def test_missing_header(header: str | None, reason: str) -> None:
    with pytest.raises(AuthError) as caught:
        bearer_token(header)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    "header", ["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc", "Bearer a b", "abc", "Bearerabc"]
)
def test_malformed_header(header: str) -> None:
    with pytest.raises(AuthError) as caught:
        bearer_token(header)
    assert caught.value.reason == "malformed"


def test_ttl_cache_expires_keeps_none_and_evicts_oldest() -> None:
    now = [0.0]
    cache: TtlCache[str, int | None] = TtlCache(max_entries=2, clock=lambda: now[0])
    cache.put("a", 1, ttl=10)
    cache.put("neg", None, ttl=1)
    assert cache.get("a") == (1,)
    assert cache.get("neg") == (None,)  # a cached "no such key" is a hit, not a miss
    assert cache.get("b") is None
    now[0] = 1.0
    assert cache.get("neg") is None
    assert cache.get("a") == (1,)
    cache.put("b", 2, ttl=10)
    cache.put("c", 3, ttl=10)  # over capacity: the oldest goes
    assert cache.get("a") is None and cache.get("b") == (2,) and cache.get("c") == (3,)
    cache.put("c", 4, ttl=0)  # ttl 0 = do not cache
    assert cache.get("c") is None
    cache.discard("b")
    assert len(cache) == 0


def test_the_cli_offers_exactly_the_scopes() -> None:
    import core.cli

    assert core.cli.SCOPES == SCOPES
