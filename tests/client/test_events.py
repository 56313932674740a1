"""capture()'s local checks and the JSON an event is sent as (pure)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from tally_client._events import build_event, now_ms, to_epoch_ms, uuid7


def load(data: bytes) -> dict[str, object]:
    doc = json.loads(data)
    assert isinstance(doc, dict)
    return doc


def test_defaults_event_id_and_ts_client_side() -> None:
    before = now_ms()
    event = load(build_event("purchase", source="web", user_id="u1", properties={"amount": 9.99}))
    assert event["type"] == "purchase" and event["source"] == "web" and event["user_id"] == "u1"
    assert event["properties"] == {"amount": 9.99}
    assert isinstance(event["ts"], int) and before <= event["ts"] <= now_ms()
    assert uuid.UUID(str(event["event_id"])).version == 7
    assert "session_id" not in event


@pytest.mark.parametrize("name", ["a", "A.b:c-d_e", "x" * 64, "0"])
def test_good_types(name: str) -> None:
    assert load(build_event(name))["type"] == name


@pytest.mark.parametrize("name", ["", "x y", "x" * 65, "é", "a/b", "a\n"])
def test_bad_types(name: str) -> None:
    with pytest.raises(ValueError, match="does not match"):
        build_event(name)


def test_type_must_be_str() -> None:
    with pytest.raises(TypeError):
        build_event(5)  # type: ignore[arg-type]


def test_ts_forms() -> None:
    moment = datetime(2026, 11, 25, 11, 0, 0, 123000, tzinfo=UTC)
    assert load(build_event("a", ts=moment))["ts"] == 1795604400123
    plus_two = moment.astimezone(timezone(timedelta(hours=2)))
    assert load(build_event("a", ts=plus_two))["ts"] == 1795604400123
    assert load(build_event("a", ts=1795604400123))["ts"] == 1795604400123
    assert to_epoch_ms(1795604400123) == 1795604400123


def test_bad_ts() -> None:
    with pytest.raises(ValueError, match="naive"):
        build_event("a", ts=datetime(2026, 1, 1))  # noqa: DTZ001 - the point
    with pytest.raises(ValueError, match="seconds"):
        build_event("a", ts=1795604400)
    with pytest.raises(TypeError):
        build_event("a", ts=True)
    with pytest.raises(TypeError):
        build_event("a", ts="2026-01-01T00:00:00Z")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        build_event("a", ts=1.5e12)  # type: ignore[arg-type]


def test_properties_checks() -> None:
    with pytest.raises(TypeError, match="properties must be a dict"):
        build_event("a", properties=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="JSON-serializable"):
        build_event("a", properties={"when": datetime.now(UTC)})
    with pytest.raises(ValueError, match="not valid JSON"):
        build_event("a", properties={"x": float("nan")})
    with pytest.raises(ValueError, match="64-bit"):
        build_event("a", properties={"big": [1, {"n": 2**63}]})
    assert load(build_event("a", properties={"ok": 2**63 - 1, "s": "1" * 30}))["properties"] == {
        "ok": 2**63 - 1,
        "s": "1" * 30,
    }
    loop: dict[str, object] = {}
    loop["self"] = loop
    with pytest.raises(ValueError):
        build_event("a", properties=loop)


def test_size_limit_is_the_json_size() -> None:
    ok = build_event("a", properties={"s": "x" * 32_000})
    assert len(ok) <= 32 * 1024
    with pytest.raises(ValueError, match="bytes as JSON; the limit is 32768"):
        build_event("a", properties={"s": "é" * 17_000})  # 34,000 bytes as UTF-8
    with pytest.raises(ValueError, match="limit is 100"):
        build_event("a", properties={"s": "x" * 100}, max_event_bytes=100)


def test_lone_surrogate_refused() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        build_event("a", properties={"s": "\ud800"})


def test_event_id_given_is_kept() -> None:
    eid = uuid.uuid4()
    assert load(build_event("a", event_id=eid))["event_id"] == str(eid)
    assert load(build_event("a", event_id=str(eid).upper()))["event_id"] == str(eid)
    with pytest.raises(ValueError, match="not a UUID"):
        build_event("a", event_id="nope")
    with pytest.raises(TypeError):
        build_event("a", event_id=5)  # type: ignore[arg-type]


def test_short_fields() -> None:
    assert load(build_event("a", session_id="s" * 256))["session_id"] == "s" * 256
    with pytest.raises(ValueError, match="user_id is 257 chars"):
        build_event("a", user_id="u" * 257)
    with pytest.raises(TypeError, match="source must be a str"):
        build_event("a", source=5)  # type: ignore[arg-type]


def test_uuid7_is_time_ordered_and_unique() -> None:
    ids = [uuid7(1_700_000_000_000 + i // 10) for i in range(1000)]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert len(set(ids)) == 1000
    stamps = [u.int >> 80 for u in parsed]
    assert stamps == sorted(stamps) and stamps[0] == 1_700_000_000_000
