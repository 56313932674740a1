"""The consumer's pure steps: decode, validate, batch preparation and the generated SQL."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from consumers.aggregate import compile_rollup, compile_rollups
from consumers.batch import Advance, prepare
from consumers.decode import UNDECODABLE, decode
from consumers.sql import upsert
from consumers.validate import Invalid, check_event, validate
from schemas.envelope import pack, unpack
from schemas.events import EventLimits, normalize_event
from schemas.rollups import parse_rollup
from tests.records import Rec

NOW = int(datetime(2024, 3, 1, 12, 0, tzinfo=UTC).timestamp() * 1000)
SPEC = parse_rollup({"name": "t", "dimensions": ["type"], "measures": ["count", "sum:properties.v"]})
PLANS = compile_rollups([SPEC])


def envelope(*raw: dict[str, Any]) -> bytes:
    encoded = [normalize_event(r, NOW, EventLimits()) for r in raw]
    return next(pack(encoded, 1 << 20))


def test_decode_refuses_what_is_not_an_envelope_and_keeps_the_record_as_is() -> None:
    for value in (b"not json", b'{"v":2,"events":[]}', b"[1,2]", b'{"v":1}', None):
        events, dead = decode(Rec(7, value, key=b"k"))
        assert events == []
        assert dead is not None
        assert dead.value == value
        assert dead.key == b"k"
        assert dead.reason == UNDECODABLE
        headers = dict(dead.headers)
        assert headers["tally-request-id"] == b"req-1"
        assert headers["tally-source-topic"] == b"events"
        assert headers["tally-source-partition"] == b"0"
        assert headers["tally-source-offset"] == b"7"
        assert headers["tally-error"]
    events, dead = decode(Rec(1, envelope({"type": "a"})))
    assert dead is None
    assert [e["type"] for e in events] == ["a"]


@pytest.mark.parametrize(("event", "reason"), [
    ("a string", "not_object"),
    ({"ts": NOW}, "bad_type"),
    ({"type": "bad type!", "ts": NOW}, "bad_type"),
    ({"type": "a\n", "ts": NOW}, "bad_type"),
    ({"type": "a"}, "bad_ts"),
    ({"type": "a", "ts": "2024-01-01T00:00:00Z"}, "bad_ts"),
    ({"type": "a", "ts": True}, "bad_ts"),
    ({"type": "a", "ts": 10**17}, "bad_ts"),
    ({"type": "a", "ts": NOW, "source": 5}, "bad_field"),
    ({"type": "a", "ts": NOW, "event_id": 5}, "bad_field"),
    ({"type": "a", "ts": NOW, "properties": [1]}, "bad_field"),
])
def test_check_event_names_what_the_aggregator_cannot_use(event: Any, reason: str) -> None:
    with pytest.raises(Invalid) as info:
        check_event(event)
    assert info.value.reason == reason


def test_validate_sends_each_bad_event_to_the_dlq_as_an_envelope_of_its_own() -> None:
    good = {"type": "a", "ts": NOW}
    bad = {"type": "a", "ts": "yesterday"}
    kept, dead = validate(Rec(3, b""), [good, bad, 17])
    assert kept == [good]
    assert [d.reason for d in dead] == ["bad_ts", "not_object"]
    assert unpack(dead[0].value) == [bad]
    assert unpack(dead[1].value) == [17]  # type: ignore[comparison-overlap]
    headers = dict(dead[0].headers)
    assert headers["tally-schema"] == b"1"
    assert headers["tally-request-id"] == b"req-1"
    assert headers["tally-source-offset"] == b"3"
    assert b"ts" in headers["tally-error"]


def test_prepare_starts_at_the_stored_offset_and_advances_past_every_record() -> None:
    polled = {
        ("events", 0): [Rec(o, envelope({"type": "a", "properties": {"v": 1.5}}), timestamp=NOW + o)
                        for o in range(5, 9)],
        ("events", 1): [Rec(20, b"garbage", partition=1, timestamp=NOW),
                        Rec(21, envelope({"type": "b"}, {"type": "b", "properties": {"v": 2}}), partition=1)],
        ("events", 2): [Rec(0, envelope({"type": "c"}), partition=2)],  # offset not loaded yet
        ("events", 3): [Rec(4, envelope({"type": "d"}), partition=3)],  # all below the stored offset
    }
    batch = prepare(polled, {("events", 0): 6, ("events", 1): 18, ("events", 3): 5}, PLANS)
    assert batch.advances == [Advance("events", 0, 6, 9), Advance("events", 1, 18, 22)]
    assert batch.unknown == [("events", 2)]
    assert batch.gaps == {("events", 1): (18, 20)}
    assert batch.first_timestamp_ms == {("events", 0): NOW + 6, ("events", 1): NOW}
    assert batch.events == 5
    assert batch.records == 5
    assert [d.reason for d in batch.dead] == [UNDECODABLE]
    bucket = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    assert batch.aggregates == {"t": {(bucket, "a"): [3, Decimal("4.5")], (bucket, "b"): [2, Decimal(2)]}}


def test_upsert_sql_merges_exactly_in_key_order_by_unnest_or_from_a_stage() -> None:
    spec = parse_rollup({"name": "x", "dimensions": ["properties.country"],
                         "measures": ["count", "sum:properties.v", "min:properties.v", "max:properties.v"]})
    up = upsert(compile_rollup(spec))
    merge = ('ON CONFLICT ("bucket", "properties_country") DO UPDATE SET '
             '"count" = "agg_x"."count" + EXCLUDED."count", '
             '"sum_properties_v" = COALESCE("agg_x"."sum_properties_v" + EXCLUDED."sum_properties_v", '
             '"agg_x"."sum_properties_v", EXCLUDED."sum_properties_v"), '
             '"min_properties_v" = LEAST("agg_x"."min_properties_v", EXCLUDED."min_properties_v"), '
             '"max_properties_v" = GREATEST("agg_x"."max_properties_v", EXCLUDED."max_properties_v")')
    columns = '"bucket", "properties_country", "count", "sum_properties_v", "min_properties_v", "max_properties_v"'
    assert str(up.statement) == (
        f'INSERT INTO "agg_x" ({columns}) SELECT * FROM unnest(CAST(:c0 AS timestamptz[]), CAST(:c1 AS text[]), '
        "CAST(:c2 AS bigint[]), CAST(:c3 AS numeric[]), CAST(:c4 AS numeric[]), CAST(:c5 AS numeric[])) "
        f"ORDER BY 1, 2 {merge}"
    )
    assert str(up.create_stage) == (
        'CREATE TEMPORARY TABLE IF NOT EXISTS "tally_stage_x" (LIKE "agg_x") ON COMMIT DELETE ROWS'
    )
    stage_sql = f'INSERT INTO "agg_x" ({columns}) SELECT {columns} FROM "tally_stage_x" ORDER BY 1, 2 {merge}'
    assert str(up.from_stage) == stage_sql
    assert up.columns == tuple(c.strip('"') for c in columns.split(", "))
    b1 = datetime(2024, 1, 1, tzinfo=UTC)
    b2 = datetime(2024, 1, 2, tzinfo=UTC)
    cells = {(b2, "a"): [1, None, None, None], (b1, "z"): [2, Decimal(1), Decimal(1), Decimal(1)]}
    assert up.params(cells) == {"c0": [b2, b1], "c1": ["a", "z"], "c2": [1, 2], "c3": [None, Decimal(1)],
                                "c4": [None, Decimal(1)], "c5": [None, Decimal(1)]}
    assert up.records(cells) == [(b2, "a", 1, None, None, None), (b1, "z", 2, Decimal(1), Decimal(1), Decimal(1))]
    assert up.params({}) == {f"c{i}": [] for i in range(6)}
