"""query.keys remembers parsed queries per query string: it must always answer exactly what
`parse_query` (the oracle, the route's old path) answers at that moment, errors included."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.cache import version_key
from core.problems import BadRequest, TallyError
from core.settings import DEFAULT_ROLLUPS
from query.cache_policy import cache_key
from query.catalog import Catalog
from query.cursor import encode
from query.keys import Resolver
from query.params import Limits, parse_query
from schemas.rollups import load_rollups

SPECS = load_rollups(DEFAULT_ROLLUPS)
SPEC = {s.name: s for s in SPECS}["events_by_type"]
LIMITS = Limits(default_limit=1_000, max_limit=10_000, max_offset=100_000, max_buckets=5_000)
SECRET = "test-secret-test-secret-test-secret"  # noqa: S105 (a test key)
PREFIX = "tally:"
START = datetime(2026, 3, 29, 0, 59, 30, tzinfo=UTC)  # an hour before Europe's spring-forward

RELATIVE = st.builds(lambda sign, n, unit: f"{sign}{n}{unit}", st.sampled_from("-+"), st.integers(0, 200),
                     st.sampled_from("smhdw"))
ABSOLUTE = st.sampled_from(["2026-03-28", "2026-03-29T01:30:00+01:00", "2026-03-27T22:00:00Z", "1700000000000"])
TIME = st.one_of(RELATIVE, ABSOLUTE, st.just("now"), st.just("garbage"))
PARAMS = st.fixed_dictionaries(
    {},
    optional={
        "from": TIME,
        "to": TIME,
        "granularity": st.sampled_from(["minute", "hour", "day", "week", "month", "year"]),
        "tz": st.sampled_from(["UTC", "Europe/Paris", "Asia/Kolkata", "America/St_Johns", "Mars/Olympus"]),
        "fields": st.sampled_from(["bucket,type,count", "type,count", "bucket,count,nope"]),
        "limit": st.sampled_from(["1", "100", "0"]),
        "order": st.sampled_from(["-count,bucket", "type"]),
    },
)
# Moments a few seconds to days apart, crossing minute, hour and day boundaries and a DST change.
STEPS = st.lists(st.sampled_from([0.0, 0.000001, 0.5, 29.0, 30.0, 59.999999, 60.0, 3_599.0, 3_600.0, 86_400.0]),
                 min_size=1, max_size=6)


def outcome(call: Callable[..., object], *args: object) -> object:
    """What `call(*args)` returns, or the problem it raises, as (type, detail)."""
    try:
        return call(*args)
    except TallyError as exc:
        return (type(exc), exc.detail)


@settings(max_examples=int(os.environ.get("TALLY_DIFF_EXAMPLES", "300")), deadline=None)
@given(queries=st.lists(PARAMS, min_size=1, max_size=3), steps=STEPS)
def test_remembered_queries_are_what_parse_query_says_now(queries: list[dict[str, str]], steps: list[float]) -> None:
    resolver = Resolver(Catalog(SPECS), LIMITS, prefix=PREFIX, secret=SECRET, remember=2)  # 2: forgetting, too
    now = START
    for step in steps:
        now += timedelta(seconds=step)
        for params in queries:
            query_string = urlencode(params)
            expected = outcome(parse_query, SPEC, parse_qsl(query_string, keep_blank_values=True), LIMITS, now)
            got = outcome(resolver.resolve, SPEC.name, query_string, now)
            if isinstance(expected, tuple):
                assert got == expected
                continue
            assert not isinstance(got, tuple)
            assert got.query == expected
            assert got.after is None
            assert got.key == cache_key(PREFIX, expected.identity())
            assert got.version_key == version_key(PREFIX, SPEC.name)


def test_a_cursor_pins_its_range_and_position() -> None:
    resolver = Resolver(Catalog(SPECS), LIMITS, prefix=PREFIX, secret=SECRET)
    asked = {"from": "-2h", "granularity": "hour", "fields": "bucket,count"}
    first = parse_query(SPEC, list(asked.items()), LIMITS, START)
    cursor = encode((datetime(2026, 3, 29, 0, 0, tzinfo=UTC),), first.fingerprint(), first.range, SECRET)
    later = START + timedelta(hours=5)  # the clock moved: later pages keep the first page's range
    got = resolver.resolve(SPEC.name, urlencode({**asked, "cursor": cursor}), later)
    assert got.query.range == first.range
    assert got.after == (datetime(2026, 3, 29, 0, 0, tzinfo=UTC),)
    assert got.key == cache_key(PREFIX, got.query.identity())
    with pytest.raises(BadRequest):  # a cursor of another question
        resolver.resolve(SPEC.name, urlencode({**asked, "from": "-3h", "cursor": cursor}), later)


def test_an_unknown_rollup_is_not_found() -> None:
    resolver = Resolver(Catalog(SPECS), LIMITS, prefix=PREFIX, secret=SECRET)
    with pytest.raises(TallyError) as err:
        resolver.resolve("nope", "", START)
    assert err.value.status == 404
