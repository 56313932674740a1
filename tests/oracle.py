"""Expected rollups computed straight from the events a test sent, independently of the
consumer's code, so the end-to-end invariant compares two different computations."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import datasketches as ds

from schemas.rollups import DEFAULT_LG_K

Row = dict[str, Any]
Key = tuple[Any, ...]


def event_time(event: dict[str, Any]) -> datetime:
    ts = event["ts"]
    if isinstance(ts, int):
        return datetime.fromtimestamp(ts / 1000, UTC)
    return datetime.fromisoformat(ts).astimezone(UTC)


def floor(dt: datetime, granularity: str) -> datetime:
    dt = dt.replace(second=0, microsecond=0)
    if granularity in ("hour", "day"):
        dt = dt.replace(minute=0)
    if granularity == "day":
        dt = dt.replace(hour=0)
    return dt


def _amount(event: dict[str, Any]) -> Decimal | None:
    value = event.get("properties", {}).get("amount")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return Decimal(value) if isinstance(value, int) else Decimal(repr(value))


def _merge(rows: dict[Key, Row], key: Key, amount: Decimal | None, with_amount: bool) -> None:
    row = rows.setdefault(key, {"count": 0, "sum": None, "min": None, "max": None})
    row["count"] += 1
    if with_amount and amount is not None:
        row["sum"] = amount if row["sum"] is None else row["sum"] + amount
        row["min"] = amount if row["min"] is None else min(row["min"], amount)
        row["max"] = amount if row["max"] is None else max(row["max"], amount)


def events_by_type(events: Iterable[dict[str, Any]], granularity: str = "minute") -> dict[Key, Row]:
    rows: dict[Key, Row] = {}
    for e in events:
        key = (floor(event_time(e), granularity), e["type"], e.get("source", ""))
        _merge(rows, key, _amount(e), True)
    return rows


def sketches_by_type(events: Iterable[dict[str, Any]], granularity: str = "minute") -> dict[Key, Row]:
    """Per events_by_type row: one HLL of its user ids built here (`users`), and its numeric amounts
    as doubles (`amounts`), what its `uniq_user_id` and `quantiles_properties_amount` must hold."""
    rows: dict[Key, Row] = {}
    for e in events:
        key = (floor(event_time(e), granularity), e["type"], e.get("source", ""))
        row = rows.setdefault(key, {"users": ds.hll_sketch(DEFAULT_LG_K, ds.tgt_hll_type.HLL_8), "amounts": []})
        if e.get("user_id") is not None:
            row["users"].update(e["user_id"])
        amount = _amount(e)
        if amount is not None:
            row["amounts"].append(float(amount))
    return rows


def page_views(events: Iterable[dict[str, Any]], granularity: str = "minute") -> dict[Key, Row]:
    rows: dict[Key, Row] = {}
    for e in events:
        if e["type"] != "page_view":
            continue
        props = e.get("properties", {})
        key = (floor(event_time(e), granularity), str(props.get("country", "")), str(props.get("path", "")))
        _merge(rows, key, None, False)
    return rows


def make_events(rng: random.Random, n: int, now_ms: int, *, span_ms: int = 3 * 3_600_000) -> list[dict[str, Any]]:
    """Valid events of every shape the rollups care about, with some amounts missing or non-numeric."""
    out: list[dict[str, Any]] = []
    for _ in range(n):
        ts_ms = now_ms - rng.randrange(span_ms)
        event: dict[str, Any] = {
            "type": rng.choice(["page_view", "page_view", "purchase", "signup", "search"]),
            "ts": ts_ms if rng.random() < 0.5 else datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(),
        }
        if rng.random() < 0.9:
            event["source"] = rng.choice(["web", "ios", "android"])
        if rng.random() < 0.8:
            event["user_id"] = f"u{rng.randrange(400)}"
        props: dict[str, Any] = {}
        if rng.random() < 0.9:
            props["country"] = rng.choice(["US", "DE", "IN", "BR"])
        if rng.random() < 0.9:
            props["path"] = rng.choice(["/", "/docs", "/cart"])
        roll = rng.random()
        if roll < 0.4:
            props["amount"] = round(rng.uniform(0, 500), 2)
        elif roll < 0.6:
            props["amount"] = rng.randrange(-50, 1000)
        elif roll < 0.65:
            props["amount"] = "12.5"  # not a number: counted, not summed
        if props:
            event["properties"] = props
        if rng.random() < 0.3:
            event["event_id"] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        out.append(event)
    return out


def invalid_events(rng: random.Random) -> list[Any]:
    return rng.choice(
        [
            [{"type": "has space"}],
            [{"type": "x", "ts": "yesterday"}],
            [{"nope": 1}],
            ["not an object"],
            [{"type": "x", "ts": 0}],
        ]
    )
