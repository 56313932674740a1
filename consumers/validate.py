"""Step 2: keep the events the aggregator can use; the rest become dead letters of their own.

Ingest already normalized every event, so this only guards against what another
producer (or a bug) could put in the topic: each check here is one the
aggregation relies on (a `ts` that buckets, string short fields, an object for
`properties`). Pure.

Deliberately absent: any check of `ts` against the clock. Ingest applied the
lateness and future windows when it accepted the event, and its 202 promised that
the event counts; a consumer that lags past the lateness window (or whose clock
disagrees with ingest's) counts it in its own event-time bucket all the same,
never in the DLQ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from consumers.decode import REPLAY_HEADER, DeadLetter, Record, dead_letter
from schemas.envelope import REQUEST_ID_HEADER, SCHEMA_HEADER, VERSION, pack
from schemas.events import SHORT_FIELDS, TYPE_PATTERN

# The datetime range (years 1..9999): a bucket must be representable in Python and in Postgres.
MIN_TS_MS = -62_135_596_800_000
MAX_TS_MS = 253_402_300_799_999
_ENVELOPE_MAX_BYTES = 1 << 62  # one event per dead-letter envelope, whatever its size


class Invalid(ValueError):
    """An event the aggregator cannot use. `reason` is the metric label, the message the detail."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def check_event(event: Any) -> None:
    """Raise Invalid if `event` lacks a required field or has one of the wrong type."""
    if not isinstance(event, dict):
        raise Invalid("not_object", "event is not a JSON object")
    etype = event.get("type")
    if not isinstance(etype, str) or not TYPE_PATTERN.fullmatch(etype):
        raise Invalid("bad_type", f"type is missing or does not match {TYPE_PATTERN.pattern}")
    ts = event.get("ts")
    if type(ts) is not int:
        raise Invalid("bad_ts", "ts is missing or not epoch milliseconds (an integer)")
    if not MIN_TS_MS <= ts <= MAX_TS_MS:
        raise Invalid("bad_ts", f"ts {ts} is outside years 1..9999")
    for name in (*SHORT_FIELDS, "event_id"):
        value = event.get(name)
        if value is not None and not isinstance(value, str):
            raise Invalid("bad_field", f"{name} must be a string")
    properties = event.get("properties")
    if properties is not None and not isinstance(properties, dict):
        raise Invalid("bad_field", "properties must be a JSON object")


def validate(record: Record, raw_events: Sequence[Any]) -> tuple[list[dict[str, Any]], list[DeadLetter]]:
    """Split one record's events into usable ones and dead letters (one envelope per bad event)."""
    good: list[dict[str, Any]] = []
    dead: list[DeadLetter] = []
    for event in raw_events:
        try:
            check_event(event)
        except Invalid as exc:
            value = next(pack([orjson.dumps(event)], _ENVELOPE_MAX_BYTES))
            headers = [(SCHEMA_HEADER, str(VERSION).encode())]
            headers += [(k, v) for k, v in record.headers if k in (REQUEST_ID_HEADER, REPLAY_HEADER)]
            dead.append(dead_letter(record, value, exc.reason, str(exc), headers))
        else:
            good.append(event)
    return good, dead
