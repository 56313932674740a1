"""Event rules: what a producer may send, and the normalized form written to Kafka.

`normalize_event` is the general way: it takes one event as orjson parsed it, checks every
rule and names the exact field and limit a refused event broke. The short way for whole
batches, msgspec structs and `Normalizer`, is `schemas.native`, which hands this module any
event it cannot plainly accept. Both write events with `encode_event`, so an event's size is
measured the same way on both. Everything here is pure.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

TYPE_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
SHORT_FIELDS = ("source", "user_id", "session_id")
KNOWN_FIELDS = frozenset({"type", "event_id", "ts", "properties", *SHORT_FIELDS})
# JSON numbers beyond this cannot be summed exactly by consumers in other languages.
MAX_SAFE_NUMBER = 2**63


@dataclass(frozen=True, slots=True)
class EventLimits:
    """Per-event limits. Each refusal names the limit it hit."""

    max_event_bytes: int = 32 * 1024
    max_depth: int = 8
    max_properties: int = 100
    max_key_chars: int = 128
    max_string_chars: int = 8192
    max_short_chars: int = 256
    lateness_ms: int = 7 * 86_400_000
    future_ms: int = 5 * 60_000


class InvalidEvent(ValueError):
    """One event broke a rule; the message is shown to the producer as is.

    `reason` is a short fixed code (the field or limit) for metrics labels.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class _RandomIds:
    """UUID4 strings from the OS's CSPRNG, drawn and formatted 256 at a time.

    `str(uuid.uuid4())` makes one `os.urandom` call and one `UUID` object per id (2 µs, a
    third of the time to normalize an event). A pool makes one call per 256 and formats
    them all at once (`_draw_uuid4`, 0.16 µs an id; an f-string per id was 0.7 µs). `next` is
    a list pop (atomic under the GIL, so threads may share the pool). Ids must stay
    unpredictable: a producer who could guess another's ids could get those events dropped as
    duplicates.
    """

    SIZE = 256

    def __init__(self) -> None:
        self.ids: list[str] = []

    def reset(self) -> None:
        self.ids = []

    def next(self) -> str:
        try:
            return self.ids.pop()
        except IndexError:
            self.ids = _draw_uuid4(self.SIZE)
            return self.ids.pop()


_VERSION_4 = bytes(b & 0x0F | 0x40 for b in range(256))
_VARIANT_RFC4122 = bytes(b & 0x3F | 0x80 for b in range(256))
# Where each of a UUID's 32 hex digits goes in its 36-character text.
_HEX_AT = tuple(i for i in range(36) if i not in (8, 13, 18, 23))


def _draw_uuid4(n: int) -> list[str]:
    """`n` random UUID4 strings, formatted column by column: 32 slice copies for all of them."""
    raw = bytearray(os.urandom(16 * n))
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_VARIANT_RFC4122)
    digits = raw.hex().encode()
    text = bytearray(b"-" * (37 * n))
    for column, at in enumerate(_HEX_AT):
        text[at::37] = digits[column::32]
    text[36::37] = b"\n" * n
    return text[:-1].decode().split("\n")


_random_ids = _RandomIds()
os.register_at_fork(after_in_child=_random_ids.reset)  # a forked child must not reuse the parent's pool
next_event_id = _random_ids.next
# One encoder for every stored event, whichever way it was read: the size limit measures its output.
encode_event = msgspec.json.Encoder().encode
# An event (an NDJSON line) that could not be parsed at all: kept in place so indexes stay true.
UNPARSABLE: Any = object()


def parse_ts(value: Any) -> int:
    """An event's `ts` (RFC 3339 or epoch ms) in epoch ms, or InvalidEvent."""
    if isinstance(value, bool):
        raise InvalidEvent("ts must be an RFC 3339 string or epoch milliseconds", "ts")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidEvent(f"ts {value[:64]!r} is not an RFC 3339 timestamp", "ts") from None
        if parsed.tzinfo is None:
            raise InvalidEvent(f"ts {value[:64]!r} has no UTC offset (RFC 3339 requires one)", "ts")
        return int(parsed.timestamp() * 1000)
    raise InvalidEvent("ts must be an RFC 3339 string or epoch milliseconds", "ts")


def _check_properties(value: Any, limits: EventLimits) -> None:
    if not isinstance(value, dict):
        raise InvalidEvent("properties must be a JSON object", "properties")
    if len(value) > limits.max_properties:
        raise InvalidEvent(f"properties has {len(value)} keys; the limit is {limits.max_properties}", "properties")
    if not _tree_ok(value, 1, limits):
        _check_tree(value, 1, limits, "properties")  # the slow walk that names the offending path


def _tree_ok(value: dict[str, Any] | list[Any], depth: int, limits: EventLimits) -> bool:
    """The same rules as `_check_tree` without building a path string per value (the hot path)."""
    if depth > limits.max_depth:
        return False
    items = value.values() if isinstance(value, dict) else value
    if isinstance(value, dict) and any(len(key) > limits.max_key_chars for key in value):
        return False
    for item in items:
        if isinstance(item, str):
            if len(item) > limits.max_string_chars:
                return False
        elif isinstance(item, dict | list):
            if not _tree_ok(item, depth + 1, limits):
                return False
        elif isinstance(item, int) and not isinstance(item, bool) and abs(item) >= MAX_SAFE_NUMBER:
            return False
    return True


def _check_tree(value: Any, depth: int, limits: EventLimits, where: str) -> None:
    if depth > limits.max_depth:
        raise InvalidEvent(f"{where} nests deeper than {limits.max_depth} levels", "depth")
    if isinstance(value, dict):
        for key, item in value.items():
            if len(key) > limits.max_key_chars:
                raise InvalidEvent(
                    f"{where} has a key of {len(key)} chars; the limit is {limits.max_key_chars}", "properties"
                )
            if isinstance(item, dict | list):
                _check_tree(item, depth + 1, limits, f"{where}.{key}")
            else:
                _check_leaf(item, limits, f"{where}.{key}")
    else:
        for i, item in enumerate(value):
            if isinstance(item, dict | list):
                _check_tree(item, depth + 1, limits, f"{where}[{i}]")
            else:
                _check_leaf(item, limits, f"{where}[{i}]")


def _check_leaf(value: Any, limits: EventLimits, where: str) -> None:
    if isinstance(value, str):
        if len(value) > limits.max_string_chars:
            raise InvalidEvent(f"{where} is {len(value)} chars; the limit is {limits.max_string_chars}", "properties")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= MAX_SAFE_NUMBER:
        raise InvalidEvent(f"{where} is outside the 64-bit integer range", "properties")


def parse_sent_at(value: Any) -> int:
    """A batch's `sent_at` (the producer's clock at sending), in epoch ms."""
    try:
        return parse_ts(value)
    except InvalidEvent as exc:
        raise ValueError(str(exc).replace("ts", "sent_at", 1)) from None


# The datetime range (years 1..9999): an instant outside it has no RFC 3339 form.
_MIN_INSTANT_MS = -62_135_596_800_000
_MAX_INSTANT_MS = 253_402_300_799_999
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _instant(ms: int) -> str:
    """Epoch ms as an RFC 3339 UTC instant (milliseconds shown only when not zero)."""
    if ms < _MIN_INSTANT_MS:
        return "before year 1"
    if ms > _MAX_INSTANT_MS:
        return "after year 9999"
    text = (_EPOCH + timedelta(milliseconds=ms)).isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00").removesuffix(".000") + "Z"


def _outside_window(ts: Any, ts_ms: int, received_at_ms: int, limits: EventLimits, skew_ms: int) -> InvalidEvent:
    """The refusal of a `ts` (as judged, `ts_ms`) outside [received - lateness, received + future].

    It shows the event's time and the window's edge as RFC 3339 instants. A late integer `ts`
    that would be inside the window read as epoch *seconds* (ts * 1000 ms, with the same
    sent_at correction) gets a hint: such a value is a date in January 1970 as milliseconds.
    """
    start, end = received_at_ms - limits.lateness_ms, received_at_ms + limits.future_ms
    shown = repr(ts[:64]) if isinstance(ts, str) else str(ts)
    corrected = " after the sent_at correction" if skew_ms else ""
    if ts_ms > end:
        future = f"more than {limits.future_ms // 1000} s in the future (the window ends {_instant(end)})"
        return InvalidEvent(f"ts {shown} is {_instant(ts_ms)}{corrected}, {future}", "ts_future")
    late = f"older than the lateness window ({limits.lateness_ms // 1000} s, starts {_instant(start)})"
    if isinstance(ts, int) and start <= ts * 1000 + skew_ms <= end:
        return InvalidEvent(
            f"ts {shown} is {_instant(ts_ms)} as epoch milliseconds{corrected}, {late}: did you send seconds?"
            " ts takes epoch milliseconds or RFC 3339",
            "ts_late",
        )
    return InvalidEvent(f"ts {shown} is {_instant(ts_ms)}{corrected}, {late}", "ts_late")


def normalize_event(raw: Any, received_at_ms: int, limits: EventLimits, skew_ms: int = 0) -> bytes:
    """Validate one raw event and return its normalized JSON, or raise InvalidEvent.

    `skew_ms` (receive time minus the batch's `sent_at`) moves a producer-clock
    `ts` onto the server's clock: ts' = received_at - (sent_at - ts).
    """
    if not isinstance(raw, dict):
        raise InvalidEvent("an event must be a JSON object", "not_object")
    unknown = raw.keys() - KNOWN_FIELDS
    if unknown:
        raise InvalidEvent(f"unknown field(s): {', '.join(sorted(unknown)[:5])}", "unknown_field")
    etype = raw.get("type")
    if not isinstance(etype, str) or not TYPE_PATTERN.fullmatch(etype):
        raise InvalidEvent(f"type is required and must match {TYPE_PATTERN.pattern}", "type")
    event: dict[str, Any] = {"type": etype}

    event_id = raw.get("event_id")
    if event_id is None:
        event["event_id"] = next_event_id()
    else:
        if not isinstance(event_id, str):
            raise InvalidEvent("event_id must be a UUID string", "event_id")
        try:
            event["event_id"] = str(uuid.UUID(event_id))
        except ValueError:
            raise InvalidEvent(f"event_id {event_id[:64]!r} is not a UUID", "event_id") from None

    ts = raw.get("ts")
    ts_ms = received_at_ms if ts is None else parse_ts(ts) + skew_ms
    if ts_ms < received_at_ms - limits.lateness_ms or ts_ms > received_at_ms + limits.future_ms:
        raise _outside_window(ts, ts_ms, received_at_ms, limits, skew_ms)
    event["ts"] = ts_ms
    event["received_at"] = received_at_ms

    for name in SHORT_FIELDS:
        value = raw.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidEvent(f"{name} must be a string", name)
        if len(value) > limits.max_short_chars:
            raise InvalidEvent(f"{name} is {len(value)} chars; the limit is {limits.max_short_chars}", name)
        event[name] = value

    properties = raw.get("properties")
    if properties is not None:
        _check_properties(properties, limits)
        event["properties"] = properties

    encoded = encode_event(event)
    if len(encoded) > limits.max_event_bytes:
        raise too_large(len(encoded), limits)
    return encoded


def too_large(size: int, limits: EventLimits) -> InvalidEvent:
    """The refusal of an event whose stored form (`encode_event`) is `size` bytes, over the limit."""
    return InvalidEvent(f"event is {size} bytes; the limit is {limits.max_event_bytes}", "too_large")


def lookup(event: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """The value at a dotted path (already split), or None where any step is missing."""
    value: Any = event
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
        if value is None:
            return None
    return value
