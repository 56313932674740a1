"""The Kafka envelope: one record carries a chunk of normalized events.

Value: the JSON `{"v": 1, "events": [...]}`; headers `tally-schema` (the version)
and `tally-request-id`. Chunks are assembled from already-encoded events (`pack`, or
`wrap` around a batch encoded in one call) so that ingest serializes each event once.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import orjson

VERSION = 1
SCHEMA_HEADER = "tally-schema"
REQUEST_ID_HEADER = "tally-request-id"
ERROR_HEADER = "tally-error"
_PREFIX = b'{"v":1,"events":['
_SUFFIX = b"]}"
OVERHEAD = len(_PREFIX) + len(_SUFFIX)  # an envelope's bytes beyond its events and the commas between them


class EnvelopeError(ValueError):
    """A record that is not a Tally envelope this code can read."""


def pack(encoded_events: Sequence[bytes], max_bytes: int) -> Iterator[bytes]:
    """Group encoded events, in order, into envelope values of at most `max_bytes` each.

    Greedy: each record takes as many of the next events as fit. An event larger than the
    bound on its own still gets a record of its own; per-event limits keep that far below the
    broker's record limit. The cut points come from bisecting the running sizes, so a batch of
    10,000 events costs a few C calls, not a Python step per event (tests/unit/test_envelope.py
    holds it to the step-per-event original).
    """
    count = len(encoded_events)
    # reach[i]: the bytes of events 0..i and of the commas between them, plus one.
    reach = list(map(operator.add, itertools.accumulate(map(len, encoded_events)), range(1, count + 1)))
    start = used = 0  # `used`: reach[start - 1], what the records before this one took
    while start < count:
        stop = max(bisect.bisect_right(reach, used + max_bytes - OVERHEAD + 1, lo=start), start + 1)
        yield _PREFIX + b",".join(encoded_events[start:stop]) + _SUFFIX
        start, used = stop, reach[stop - 1]


def wrap(events_array: bytes) -> bytes:
    """The value of one envelope whose events are `events_array`, a JSON array of encoded events."""
    return _PREFIX[:-1] + events_array + _SUFFIX[1:]


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
