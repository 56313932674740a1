"""The short way: a batch read, checked and written in compiled code, with Python only per event.

A JSON body is decoded by msgspec straight into `NativeEvent` structs whose types carry the
event limits (short-field lengths, the property tree's count, depth, key and string lengths,
the 64-bit integer range), so those rules cost nothing in Python. `Normalizer` then checks a
batch's events (type, id, time window), fills in what the server adds (`event_id`,
`received_at`, `ts` in epoch ms) in the structs themselves, and `finish` encodes them (one
msgspec call for a usual batch) and packs the envelopes.

Anything not plainly valid here (a body out of shape, an id to canonicalize, a time outside the
window, an event over the size limit, a dict from the general reader) is handed to
`schemas.events.normalize_event`, which decides and names the refusal: the rules live there,
and tests/unit/test_native_events.py holds both ways equal on any body. Nothing here does I/O.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from schemas import envelope
from schemas.events import (
    MAX_SAFE_NUMBER,
    TYPE_PATTERN,
    UNPARSABLE,
    EventLimits,
    InvalidEvent,
    encode_event,
    next_event_id,
    normalize_event,
    parse_ts,
    too_large,
)

_UNSET = msgspec.UNSET
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").fullmatch
# Event types are few: one that matched TYPE_PATTERN once is known (a set lookup instead of a
# regex per event; msgspec's pattern constraint runs Python's `re`, 0.55 µs an event), up to a
# bound, so that a producer sending random types cannot grow it.
_VALID_TYPES: set[str] = set()
_VALID_TYPES_KEPT = 10_000
# What normalizing adds to an event's JSON, at most about: an id, `received_at`, `ts` in ms.
_ADDED_BYTES = 100


class NativeEvent(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    """One event as msgspec decodes it, and as it is stored once `Normalizer` accepted it.

    Read: only the known fields, each of its JSON type (the decoder of a set of limits,
    `_event_type`, narrows the types of all but the first two). `event_id` is UNSET when absent and None
    when sent as null: an Idempotency-Key derives an id only for the first (as for a dict
    without the key). `received_at` is the server's: one sent by a producer is refused.
    Stored: `Normalizer` sets `event_id`, `ts` (epoch ms) and `received_at` in place, and the
    struct encodes as the envelope's event (README, "The Kafka envelope"): `normalize_event`'s
    fields in its order, those without a value left out. No copy is made of the event.
    """

    type: str
    event_id: str | msgspec.UnsetType | None = _UNSET
    ts: int | str | None = None
    received_at: int | msgspec.UnsetType = _UNSET
    source: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    properties: dict[str, Any] | None = None

    def as_raw(self) -> dict[str, Any]:
        """The event as the JSON object it came from (fields sent as null included); only for an
        event not yet normalized."""
        return {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not _UNSET}


# Any integer a producer may send (|n| < 2^63): msgspec reads integers exactly, and a bigger one
# fails the decode, so the general way refuses it (orjson would have rounded it to a float).
_INT64 = Annotated[int, Meta(ge=1 - MAX_SAFE_NUMBER, le=MAX_SAFE_NUMBER - 1)]


def _property_type(limits: EventLimits) -> Any:
    """The property tree `_check_properties` allows, as a msgspec type: containers nest at most
    `max_depth` levels (`properties` itself is the first), keys and strings bounded in length,
    integers inside the 64-bit range."""
    if limits.max_depth < 1:
        return None  # no object is allowed: every non-null `properties` goes the general way
    key = Annotated[str, Meta(max_length=limits.max_key_chars)]
    leaf = Annotated[str, Meta(max_length=limits.max_string_chars)] | _INT64 | float | bool | None
    value: Any = leaf
    for _ in range(limits.max_depth - 1):
        value = leaf | list[value] | dict[key, value]
    return Annotated[dict[key, value], Meta(max_length=limits.max_properties)]


_SENT_AT = _INT64 | str | None
# A body bigger than this is read in two steps (`decode_native(lazy=True)`, then `decode_slice`),
# so that reading it can yield to the event loop: 1.2 MB of events take ~7 ms in one call.
LAZY_BODY_BYTES = 256 * 1024
_NOT_PLAIN = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


class NotNative(Exception):
    """A lazily read body holds an event that is not plainly valid: read it the general way."""


@functools.cache
def _event_type(limits: EventLimits) -> Any:
    short = Annotated[str, Meta(max_length=limits.max_short_chars)] | None
    return msgspec.defstruct(
        "NativeEvent",
        [
            ("ts", _INT64 | str | None, None),
            ("received_at", _INT64 | msgspec.UnsetType, _UNSET),
            ("source", short, None),
            ("user_id", short, None),
            ("session_id", short, None),
            ("properties", _property_type(limits) | None, None),
        ],
        bases=(NativeEvent,),
        forbid_unknown_fields=True,
        omit_defaults=True,
        gc=False,
    )


def _batch_decoder(event: Any) -> msgspec.json.Decoder[Any]:
    """`{"events": [...], "sent_at": ...}` or `[...]`, each event an `event`."""
    batch: Any = msgspec.defstruct(
        "NativeBatch", [("events", list[event]), ("sent_at", _SENT_AT, None)], forbid_unknown_fields=True, gc=False
    )
    return msgspec.json.Decoder(batch | list[event])


@functools.cache
def _decoder(limits: EventLimits) -> msgspec.json.Decoder[Any]:
    """The body decoder for one set of limits."""
    return _batch_decoder(_event_type(limits))


@functools.cache
def _lazy_decoder() -> msgspec.json.Decoder[Any]:
    """A body's shape only, its events left as their raw JSON (checked to be JSON, no more)."""
    return _batch_decoder(msgspec.Raw)


@functools.cache
def _events_decoder(limits: EventLimits) -> msgspec.json.Decoder[Any]:
    event = _event_type(limits)
    return msgspec.json.Decoder(list[event])  # type: ignore[valid-type]


def decode_native(body: bytes, limits: EventLimits, *, lazy: bool = False) -> tuple[list[Any], Any] | None:
    """A JSON body's events and `sent_at`, when every event has the shape and sizes the limits
    allow; None otherwise (not JSON, another top level, any event out of shape or over a limit),
    and the caller reads the body the general way, which names what is wrong.

    `lazy`: the events come back as `msgspec.Raw`, to be read a slice at a time by `decode_slice`,
    which raises NotNative where this would have returned None."""
    try:
        doc = (_lazy_decoder() if lazy else _decoder(limits)).decode(body)
    except _NOT_PLAIN:
        return None
    return (doc, None) if isinstance(doc, list) else (doc.events, doc.sent_at)


def decode_slice(events: list[Any], start: int, stop: int, limits: EventLimits) -> None:
    """Read `events[start:stop]`, left raw by `decode_native(lazy=True)`, into NativeEvents in place."""
    try:
        events[start:stop] = _events_decoder(limits).decode(b"[" + b",".join(events[start:stop]) + b"]")
    except _NOT_PLAIN:
        raise NotNative from None


@dataclass
class Normalized:
    """A batch's outcome: the envelope values of the accepted events, and the refusals by index."""

    values: list[bytes]
    accepted: int
    rejected: list[tuple[int, InvalidEvent]] = field(default_factory=list)


class Normalizer:
    """Checks and normalizes one batch's events, `run(start, stop)` a slice at a time (so a big
    batch can yield to the event loop between slices), then `finish` encodes and packs them.

    A batch that may not fit one event's size limit in all (judged from `body_bytes`, the size
    of the body it came in) is encoded slice by slice in `run`, a smaller one in one call in
    `finish`. The Normalizer owns the events: it fills in the server's fields of those it
    accepts, so a batch is normalized once. `derive_id(index)` gives an event sent without an
    `event_id` its id (an Idempotency-Key's derived ids); otherwise such an event, or one whose
    id is null, gets a random UUID4.
    Events that are `UNPARSABLE` (an NDJSON line that is not JSON) are skipped: the reader
    has already refused them.
    """

    def __init__(
        self,
        events: list[Any],
        received_at_ms: int,
        limits: EventLimits,
        skew_ms: int = 0,
        derive_id: Callable[[int], str] | None = None,
        *,
        body_bytes: int = 0,
    ) -> None:
        self.events = events
        self.received_at_ms = received_at_ms
        self.limits = limits
        self.skew_ms = skew_ms
        self.derive_id = derive_id
        self.kept: list[NativeEvent | msgspec.Raw] = []
        self.indexes: list[int] = []  # of the kept events, for a refusal found when encoding
        self.rejected: list[tuple[int, InvalidEvent]] = []
        # A batch whose stored events cannot all fit one event's size limit is encoded slice by
        # slice as it is checked (so `finish` holds the loop less, and nothing is encoded twice).
        big = body_bytes + _ADDED_BYTES * len(events) > limits.max_event_bytes
        self.encoded: list[bytes] | None = [] if big else None

    def run(self, start: int, stop: int) -> None:
        events, kept, indexes, derive = self.events, self.kept, self.indexes, self.derive_id
        received, skew = self.received_at_ms, self.skew_ms
        earliest, latest = received - self.limits.lateness_ms, received + self.limits.future_ms
        for index in range(start, stop):
            raw = events[index]
            if not isinstance(raw, NativeEvent):
                if raw is not UNPARSABLE:
                    self._general(index, raw)
                continue
            if raw.received_at is not _UNSET:  # the server's field, sent: the general way refuses it
                self._general(index, raw)
                continue
            etype = raw.type
            if etype not in _VALID_TYPES:
                if not TYPE_PATTERN.fullmatch(etype):
                    self._general(index, raw)
                    continue
                if len(_VALID_TYPES) < _VALID_TYPES_KEPT:
                    _VALID_TYPES.add(etype)
            event_id = raw.event_id
            if event_id is _UNSET:
                event_id = next_event_id() if derive is None else derive(index)
            elif event_id is None:
                event_id = next_event_id()
            elif not _CANONICAL_UUID(event_id):
                self._general(index, raw)
                continue
            ts = raw.ts
            if ts is None:
                ts_ms = received
            elif type(ts) is int:
                ts_ms = ts + skew
            else:
                try:
                    ts_ms = parse_ts(ts) + skew
                except InvalidEvent:
                    self._general(index, raw)  # which names what is wrong with it
                    continue
            if ts_ms < earliest or ts_ms > latest:
                self._general(index, raw)
                continue
            raw.event_id, raw.ts, raw.received_at = event_id, ts_ms, received
            kept.append(raw)
            indexes.append(index)
        if self.encoded is not None:
            self.encoded += map(encode_event, kept[len(self.encoded) :])

    def _general(self, index: int, raw: Any) -> None:
        """`normalize_event` decides: the event's bytes, or its refusal."""
        if isinstance(raw, NativeEvent):
            raw = raw.as_raw()
        if self.derive_id is not None and isinstance(raw, dict) and "event_id" not in raw:
            raw["event_id"] = self.derive_id(index)
        try:
            self.kept.append(msgspec.Raw(normalize_event(raw, self.received_at_ms, self.limits, self.skew_ms)))
            self.indexes.append(index)
        except InvalidEvent as exc:
            self.rejected.append((index, exc))

    def finish(self, envelope_max_bytes: int) -> Normalized:
        """Encode the accepted events and pack them into envelope values. An event over the size
        limit is refused here, as the general way would: it measures the same encoder's output."""
        values, accepted = self._envelopes(envelope_max_bytes)
        self.rejected.sort(key=lambda refusal: refusal[0])
        return Normalized(values, accepted, self.rejected)

    def _envelopes(self, envelope_max_bytes: int) -> tuple[list[bytes], int]:
        if self.encoded is None:  # the usual batch: one call, and one envelope if it fits
            array = encode_event(self.kept)
            events_bytes = len(array) - 2  # no event is longer than all of them
            if events_bytes <= self.limits.max_event_bytes and events_bytes + envelope.OVERHEAD <= envelope_max_bytes:
                return ([envelope.wrap(array)] if self.kept else []), len(self.kept)
        encoded = self.encoded if self.encoded is not None else list(map(encode_event, self.kept))
        if encoded and max(map(len, encoded)) > self.limits.max_event_bytes:
            encoded = self._refuse_oversized(encoded)
        return list(envelope.pack(encoded, envelope_max_bytes)), len(encoded)

    def _refuse_oversized(self, encoded: list[bytes]) -> list[bytes]:
        kept: list[bytes] = []
        for index, data in zip(self.indexes, encoded, strict=True):
            if len(data) <= self.limits.max_event_bytes:
                kept.append(data)
            else:
                self.rejected.append((index, too_large(len(data), self.limits)))
        return kept
