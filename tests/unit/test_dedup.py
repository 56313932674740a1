"""The pure half of event_id de-duplication: keys, which events count, and the time rules."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

from consumers.aggregate import compile_rollups
from consumers.batch import prepare
from consumers.dedup import (
    COMMIT_DEADLINE,
    MARGIN,
    Candidates,
    commit_too_late,
    counted,
    days_to_create,
    dedup_key,
    expired,
    near_midnight,
    partition_day,
    partition_name,
    window_days,
)
from schemas.envelope import pack
from schemas.events import EventLimits, normalize_event
from schemas.rollups import parse_rollup
from tests.records import Rec, views

ID = "6f1c2d3e-4a5b-4c6d-8e7f-0123456789ab"


def test_keys_are_canonical_uuid_text_and_other_ids_still_deduplicate() -> None:
    assert dedup_key(ID) == ID
    assert dedup_key(ID.upper()) == ID
    assert dedup_key("{" + ID + "}") == ID
    assert dedup_key(ID.replace("-", "")) == ID
    foreign = dedup_key("order-42")
    assert foreign is not None and foreign == dedup_key("order-42") != dedup_key("order-43")
    assert uuid.UUID(foreign).version == 5
    assert dedup_key(None) is None
    assert dedup_key(5) is None


def test_the_first_occurrence_of_an_unseen_id_counts_and_events_without_ids_always_do() -> None:
    plans = compile_rollups([parse_rollup({"name": "r", "dimensions": ["type"], "measures": ["count"]})])
    a, b, c = views(plans, [{"type": "x", "ts": i, "event_id": str(uuid.uuid4())} for i in range(3)])
    anonymous, anonymous2 = views(plans, [{"type": "x", "ts": 9}] * 2)
    a2, b2 = views(plans, [{"type": "x", "ts": 10 + i, "event_id": e.event_id} for i, e in enumerate((a, b))])
    events = [a, b, a2, anonymous, c, anonymous2, b2]
    cand = Candidates.of(events)
    assert cand.distinct == [a.event_id, b.event_id, c.event_id]
    assert cand.repeats
    assert counted(cand, []) == [a, b, anonymous, c, anonymous2]
    assert counted(cand, [b.event_id]) == [a, anonymous, c, anonymous2]
    assert counted(cand, [a.event_id, b.event_id, c.event_id]) == [anonymous, anonymous2]
    assert not Candidates.of([a, b, anonymous, anonymous2]).repeats
    odd = views(plans, [{"type": "x", "ts": 1, "event_id": i} for i in (a.event_id.upper(), "k")])
    assert Candidates.of(odd).keys == [a.event_id, dedup_key("k")]


def test_prepare_collects_candidates_only_when_asked() -> None:
    now = int(datetime(2024, 3, 1, tzinfo=UTC).timestamp() * 1000)
    encoded = [normalize_event({"type": "a", "ts": now}, now, EventLimits()) for _ in range(3)]

    record = Rec(0, next(pack(encoded, 1 << 20)), "t", timestamp=now)
    plans = compile_rollups([parse_rollup({"name": "r", "dimensions": ["type"], "measures": ["count"]})])
    assert prepare({("t", 0): [record]}, {("t", 0): 0}, plans).candidates is None
    batch = prepare({("t", 0): [record]}, {("t", 0): 0}, plans, dedup=True)
    assert batch.candidates is not None
    assert len(batch.candidates.distinct) == 3 and not batch.candidates.repeats


def test_window_days_cover_at_least_the_window() -> None:
    assert [window_days(h) for h in (1, 23, 24, 25, 48, 49)] == [1, 1, 1, 2, 2, 3]


def test_near_midnight_is_the_first_margin_of_a_utc_day() -> None:
    midnight = datetime(2026, 3, 1, tzinfo=UTC)
    assert near_midnight(midnight)
    assert near_midnight(midnight + MARGIN - timedelta(microseconds=1))
    assert not near_midnight(midnight + MARGIN)
    assert not near_midnight(midnight - timedelta(microseconds=1))
    # The UTC day counts, not the local one.
    assert near_midnight(datetime.fromisoformat("2026-03-01T01:10:00+01:00"))


def test_a_transaction_begun_before_midnight_may_not_commit_past_the_deadline() -> None:
    midnight = datetime(2026, 3, 2, tzinfo=UTC)
    before = midnight - timedelta(seconds=10)
    assert not commit_too_late(before, 5.0)
    assert not commit_too_late(before, 10.0 + COMMIT_DEADLINE.total_seconds() - 1)
    assert commit_too_late(before, 10.0 + COMMIT_DEADLINE.total_seconds())
    # Long transactions in the middle of a day are fine.
    assert not commit_too_late(midnight + timedelta(hours=1), 3600.0)
    assert COMMIT_DEADLINE < MARGIN


def test_partitions_are_named_by_day_and_expire_after_the_window() -> None:
    day = date(2026, 11, 25)
    assert partition_name(day) == "tally_seen_events_p20261125"
    assert partition_day(partition_name(day)) == day
    assert partition_day("tally_seen_events_pnope") is None
    assert partition_day("agg_events") is None
    assert days_to_create(day, 2) == [day + timedelta(days=d) for d in (-1, 0, 1, 2)]
    days = [day + timedelta(days=d) for d in range(-5, 3)]
    assert expired(days, day, 24) == [day + timedelta(days=d) for d in (-5, -4, -3, -2)]
    assert expired(days, day, 30) == [day + timedelta(days=d) for d in (-5, -4, -3)]
