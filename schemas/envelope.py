"""The Kafka envelope: one record carries a chunk of normalized events.

Value: orjson of `{"v": 1, "events": [...]}`; headers `tally-schema` (the version)
and `tally-request-id`. Chunks are assembled from already-encoded events so that
ingest serializes each event exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson

VERSION = 1
SCHEMA_HEADER = "tally-schema"
REQUEST_ID_HEADER = "tally-request-id"
ERROR_HEADER = "tally-error"
_PREFIX = b'{"v":1,"events":['
_SUFFIX = b"]}"
_OVERHEAD = len(_PREFIX) + len(_SUFFIX)
OVERHEAD = _OVERHEAD  # an envelope's bytes beyond its events and the commas between them


class EnvelopeError(ValueError):
    """A record that is not a Tally envelope this code can read."""


def pack(encoded_events: Iterable[bytes], max_bytes: int) -> Iterator[bytes]:
    """Group encoded events into envelope values of at most `max_bytes` each.

    An event larger than the bound on its own still gets a record of its own;
    per-event limits keep that far below the broker's record limit.
    """
    chunk: list[bytes] = []
    size = _OVERHEAD
    for event in encoded_events:
        added = len(event) + (1 if chunk else 0)
        if chunk and size + added > max_bytes:
            yield _PREFIX + b",".join(chunk) + _SUFFIX
            chunk, size, added = [], _OVERHEAD, len(event)
        chunk.append(event)
        size += added
    if chunk:
        yield _PREFIX + b",".join(chunk) + _SUFFIX


def wrap(events_array: bytes) -> bytes:
    """The value of one envelope whose events are `events_array`, a JSON array of encoded events."""
    return _PREFIX[:-1] + events_array + _SUFFIX[1:]


def pack_all(encoded_events: list[bytes], max_bytes: int) -> list[bytes]:
    """`pack`'s values as a list; a batch that fits one envelope (the usual case) in one join."""
    if not encoded_events:
        return []
    if sum(map(len, encoded_events)) + len(encoded_events) - 1 + _OVERHEAD <= max_bytes:
        return [_PREFIX + b",".join(encoded_events) + _SUFFIX]
    return list(pack(encoded_events, max_bytes))


def headers(request_id: str) -> list[tuple[str, bytes]]:
    return [(SCHEMA_HEADER, b"1"), (REQUEST_ID_HEADER, request_id.encode())]


def unpack(value: bytes | None) -> list[dict[str, Any]]:
    """The events of one record, or EnvelopeError naming why it cannot be read."""
    if value is None:
        raise EnvelopeError("record has no value")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"record is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise EnvelopeError(f"record is not a version {VERSION} envelope")
    events = doc.get("events")
    if not isinstance(events, list):
        raise EnvelopeError("envelope has no events list")
    return events
