"""Building one event: local validation, client-side ids and times, the JSON it is sent as. Pure
(reads the clock and the OS's random source, nothing else)."""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

TYPE_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_SHORT_CHARS = 256
# An integer ts below this (March 1973 as epoch ms) is almost surely epoch seconds.
_MIN_PLAUSIBLE_MS = 100_000_000_000
_MAX_INT64 = 2**63

_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=True).encode


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class _RandomPool:
    """80-bit random ints from the OS's CSPRNG, drawn 256 at a time: one `os.urandom` call per id
    was half of capture()'s cost. `pop` is atomic under the GIL, so threads share the pool; a
    forked child starts a pool of its own (it must not repeat the parent's ids)."""

    SIZE = 256

    def __init__(self) -> None:
        self.values: list[int] = []

    def reset(self) -> None:
        self.values = []

    def next(self) -> int:
        try:
            return self.values.pop()
        except IndexError:
            raw = os.urandom(10 * self.SIZE)
            self.values = [int.from_bytes(raw[i : i + 10], "big") for i in range(0, len(raw), 10)]
            return self.values.pop()


_random = _RandomPool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_random.reset)


def uuid7(ms: int | None = None) -> str:
    """A time-ordered UUID (RFC 9562 version 7): 48 bits of Unix ms, then 74 random bits."""
    if ms is None:
        ms = now_ms()
    rand = _random.next()
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 68 & 0xFFF) << 64 | 0b10 << 62
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF
    h = f"{value:032x}"  # formatted directly: uuid.UUID(int=...) and str() cost 3x as much
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def to_epoch_ms(ts: Any) -> int:
    """An aware datetime or epoch milliseconds, as epoch ms; ValueError/TypeError otherwise."""
    if isinstance(ts, bool):
        raise TypeError("ts must be an aware datetime, epoch milliseconds (int) or None")
    if isinstance(ts, int):
        if ts < _MIN_PLAUSIBLE_MS:
            raise ValueError(f"ts {ts} is before 1973 as epoch milliseconds: did you pass seconds?")
        return ts
    if isinstance(ts, datetime):
        if ts.tzinfo is None or ts.utcoffset() is None:
            raise ValueError("ts is a naive datetime; give it a timezone (e.g. datetime.now(UTC))")
        return int(ts.timestamp() * 1000)
    raise TypeError(f"ts must be an aware datetime, epoch milliseconds (int) or None, not {type(ts).__name__}")


def _short(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    if len(value) > MAX_SHORT_CHARS:
        raise ValueError(f"{name} is {len(value)} chars; the limit is {MAX_SHORT_CHARS}")


def build_event(
    type: str,
    *,
    source: str | None = None,
    user_id: str | None = None,
    session_id: str | None = None,
    properties: Mapping[str, Any] | None = None,
    ts: datetime | int | None = None,
    event_id: str | uuid.UUID | None = None,
    max_event_bytes: int = 32 * 1024,
) -> bytes:
    """One event as the UTF-8 JSON object it is sent as; ValueError/TypeError for what is wrong.

    `ts` defaults to now (the producer's clock; the batch's `sent_at` lets the server correct
    it), `event_id` to a new UUIDv7, so a retried event keeps both.
    """
    if not isinstance(type, str):
        raise TypeError(f"type must be a str, not {type.__class__.__name__}")
    if TYPE_PATTERN.fullmatch(type) is None:
        raise ValueError(f"type {type[:80]!r} does not match ^[A-Za-z0-9_.:-]{{1,64}}$")
    ms = now_ms() if ts is None else to_epoch_ms(ts)
    if event_id is None:
        eid = uuid7()
    elif isinstance(event_id, uuid.UUID):
        eid = str(event_id)
    elif isinstance(event_id, str):
        try:
            eid = str(uuid.UUID(event_id))
        except ValueError:
            raise ValueError(f"event_id {event_id[:80]!r} is not a UUID") from None
    else:
        raise TypeError(f"event_id must be a str or uuid.UUID, not {event_id.__class__.__name__}")
    event: dict[str, Any] = {"type": type, "event_id": eid, "ts": ms}
    if source is not None:
        _short("source", source)
        event["source"] = source
    if user_id is not None:
        _short("user_id", user_id)
        event["user_id"] = user_id
    if session_id is not None:
        _short("session_id", session_id)
        event["session_id"] = session_id
    if properties is not None:
        if not isinstance(properties, Mapping):
            raise TypeError(f"properties must be a dict, not {properties.__class__.__name__}")
        event["properties"] = properties
    try:
        data = _encode(event).encode()
    except TypeError as exc:  # a value JSON cannot hold (a set, a datetime, an object)
        raise TypeError(f"properties are not JSON-serializable: {exc}") from None
    except ValueError as exc:  # NaN/Infinity, a circular reference
        raise ValueError(f"properties are not valid JSON: {exc}") from None
    except UnicodeEncodeError:  # a lone surrogate: not JSON (RFC 8259), refused by the server
        raise ValueError("the event holds a lone surrogate (not valid Unicode)") from None
    if len(data) > max_event_bytes:
        raise ValueError(f"the event is {len(data)} bytes as JSON; the limit is {max_event_bytes}")
    if properties and _has_giant_int(data):
        raise ValueError("properties hold an integer outside the 64-bit range; send it as a string")
    return data


_LONG_DIGITS = re.compile(rb"\d{19,}")


def _has_giant_int(data: bytes) -> bool:
    """Whether an integer of the encoded event is outside the 64-bit range (cheap pre-test first)."""
    if _LONG_DIGITS.search(data) is None:
        return False
    return _any_giant(json.loads(data))


def _any_giant(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_any_giant(v) for v in value.values())
    if isinstance(value, list):
        return any(_any_giant(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _MAX_INT64


def decode_events(encoded: list[bytes]) -> list[dict[str, Any]]:
    """The events of a batch as dicts, for the application's callbacks."""
    return [json.loads(e) for e in encoded]
