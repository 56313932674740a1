"""Reading a batch: bounded body decoding and the three body forms.

The decoded-size limit is enforced while decompressing, so a gzip bomb is
refused after reading at most `limit` decoded bytes, not after inflating it.
The whole body must arrive within a deadline, so a client that stalls mid-body
(slow-loris) gets a 408 instead of holding its connection and buffer forever.

JSON is read by msgspec the short way (schemas.native) and by orjson the general way, which
names every refusal: duplicate keys keep the last value (as JavaScript does),
NaN/Infinity, lone surrogates and numbers that overflow a double are not JSON and
refuse the body (or the NDJSON line). orjson reads an integer beyond the 64-bit
range as a float, which would silently round it; such events are refused instead.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import ClientDisconnect

from core.looplag import in_slices
from core.problems import BadRequest, PayloadTooLarge, TallyError, UnsupportedMediaType
from schemas.events import KNOWN_FIELDS, MAX_SAFE_NUMBER, UNPARSABLE, EventLimits, parse_sent_at
from schemas.native import LAZY_BODY_BYTES, NotNative, decode_native, decode_slice

JSON_TYPES = frozenset({"application/json", ""})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
# 19 digits in a row: the only way to write an integer that orjson turns into a float. Found by
# mapping digits to "0" and all else to " " then searching: 1 ns a byte, a tenth of a regex.
_DIGITS_ONLY = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_DIGITS = b"0" * 19
BIG_INTEGER = "an integer in the event is outside the 64-bit range (|n| < 2^63); send it as a string"


class RequestTimeout(TallyError):
    """The body did not arrive in time: the connection is closed, its buffer freed."""

    status, title, slug = 408, "Request timeout", "timeout"


@dataclass
class ParsedBatch:
    events: list[Any]
    line_errors: dict[int, str] = field(default_factory=dict)
    sent_at_ms: int | None = None  # the producer's clock when it sent the batch
    reasons: dict[int, str] = field(default_factory=dict)  # metrics reason of a line error; default "json"

    def refuse(self, index: int, error: str, reason: str) -> None:
        self.events[index] = UNPARSABLE
        self.line_errors[index] = error
        self.reasons[index] = reason


class BoundedBody:
    """Accumulates a request body, inflating gzip on the fly, up to `limit` decoded bytes."""

    def __init__(self, limit: int, *, gzip: bool) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None

    def feed(self, chunk: bytes) -> None:
        if self._inflater is None:
            self._append(chunk)
            return
        data = chunk
        while data:
            try:
                out = self._inflater.decompress(data, self._limit - self._size + 1)
            except zlib.error as exc:
                raise BadRequest(f"body is not valid gzip: {exc}") from None
            self._append(out)
            data = self._inflater.unconsumed_tail
            if self._inflater.eof and self._inflater.unused_data:  # another gzip member follows
                data = self._inflater.unused_data + data
                self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def finish(self) -> bytes:
        if self._inflater is not None:
            self._append(self._inflater.flush())
            if not self._inflater.eof:
                raise BadRequest("gzip body is truncated")
        return b"".join(self._parts)

    def _append(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            raise PayloadTooLarge(f"decoded body exceeds the limit of {self._limit} bytes")
        if data:
            self._parts.append(data)


async def read_body(
    chunks: AsyncIterator[bytes],
    *,
    content_length: int | None,
    encoding: str,
    limit: int,
    deadline_seconds: float | None = None,
) -> bytes:
    """The decoded body, read within `deadline_seconds` in all (a deadline, not an idle timer:
    a trickle of one byte a second must not keep a connection forever)."""
    encoding = encoding.strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; use gzip or none")
    if content_length is not None and content_length > limit:
        # The body is never read: close the connection rather than drain it.
        raise PayloadTooLarge(
            f"body of {content_length} bytes exceeds the limit of {limit} bytes", headers={"Connection": "close"}
        )
    body = BoundedBody(limit, gzip=encoding in ("gzip", "x-gzip"))
    try:
        async with asyncio.timeout(deadline_seconds):
            async for chunk in chunks:
                body.feed(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the body did not arrive within {deadline_seconds:g} s (TALLY_BODY_TIMEOUT_SECONDS)",
            headers={"Connection": "close"},
        ) from None
    except ClientDisconnect:
        # Nobody reads this answer; it keeps the metrics honest (a client error, not a 500).
        raise BadRequest("the client closed the connection before the body was complete") from None
    return body.finish()


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


async def parse_batch_yielding(
    body: bytes, content_type: str, *, max_events: int, native: EventLimits, lazy_above: int = LAZY_BODY_BYTES
) -> ParsedBatch:
    """Ingest's reader: a JSON body whose events all have the shape and sizes of `native`, the
    event limits, comes back as `schemas.native.NativeEvent`s, which `schemas.native.Normalizer`
    takes the short way; any other body as `parse_batch` reads it (the general way), with the
    same answers and envelopes.

    A body over `lazy_above` bytes is read in slices that let other requests in between
    (`core.looplag.in_slices`): its outline first, then its events; if one is not plainly
    valid, or there are too many, orjson reads them in slices too (`_read_general`).
    """
    if media_type(content_type) not in JSON_TYPES:
        return parse_batch(body, content_type, max_events=max_events)
    lazy = len(body) > lazy_above
    read = _read_native(body, native, lazy=lazy)
    if read is None:
        return parse_batch(body, content_type, max_events=max_events)
    events, sent_at_ms = read
    if not lazy:
        if len(events) > max_events:
            raise _too_many(len(events), max_events)
        return ParsedBatch(events, sent_at_ms=sent_at_ms)
    raws = list(events)  # each event's JSON, for the general way
    if len(events) <= max_events:
        try:
            await in_slices(lambda start, stop: decode_slice(events, start, stop, native), len(events))
            return ParsedBatch(events, sent_at_ms=sent_at_ms)
        except NotNative:
            pass
    return await _read_general(body, content_type, raws, sent_at_ms, max_events)


class _Whole(Exception):
    """An event the general way can judge only from the whole body."""


async def _read_general(
    body: bytes, content_type: str, raws: list[Any], sent_at_ms: int | None, max_events: int
) -> ParsedBatch:
    """The events of a body whose outline msgspec read (`raws`, each event's JSON), read by orjson
    a slice at a time: the same batch as `parse_batch`'s one call over the body, or its 413. An
    event that is not JSON to orjson (the 400 names its place in the body) or that has a run of
    19 digits (the big-integer check reads the body whole) sends the body there instead."""
    events: list[Any] = [None] * len(raws)

    def read(start: int, stop: int) -> None:
        for index in range(start, stop):
            text = bytes(raws[index])
            if _has_long_digits(text):
                raise _Whole
            try:
                events[index] = orjson.loads(text)
            except orjson.JSONDecodeError:
                raise _Whole from None

    try:
        await in_slices(read, len(raws))
    except _Whole:
        return parse_batch(body, content_type, max_events=max_events)
    if len(events) > max_events:
        raise _too_many(len(events), max_events)
    return ParsedBatch(events, sent_at_ms=sent_at_ms)


def parse_batch(body: bytes, content_type: str, *, max_events: int) -> ParsedBatch:
    """Split a body into raw events the general way (orjson dicts, which `normalize_event` judges
    and explains). Only a body that cannot be split at all is a 400."""
    kind = media_type(content_type)
    if kind in NDJSON_TYPES:
        batch = _parse_ndjson(body)
    elif kind in JSON_TYPES:
        batch = _parse_json(body, max_events)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {kind!r} is not supported; use application/json or application/x-ndjson"
        )
    if len(batch.events) > max_events:
        raise _too_many(len(batch.events), max_events)
    return batch


def _too_many(count: int, max_events: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"batch has {count} events; the limit is {max_events}")


def _has_long_digits(text: bytes) -> bool:
    """Whether `text` has a run of 19 digits: the only way to write an integer orjson rounds."""
    return _LONG_DIGITS in text.translate(_DIGITS_ONLY)


class _Big:
    """Stands for an integer literal orjson would have rounded to a float."""


_BIG = _Big()


def _int_or_big(text: str) -> int | _Big:
    if len(text.lstrip("-")) > 20:  # never call int() on thousands of digits
        return _BIG
    value = int(text)
    return _BIG if abs(value) >= MAX_SAFE_NUMBER else value


def _any_leaf(value: Any, test: Callable[[Any], bool]) -> bool:
    """Whether any scalar inside `value` passes `test`; iterative, since orjson admits 1024 levels."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif test(item):
            return True
    return False


def _is_big(value: Any) -> bool:
    return value is _BIG


def _integral_giant(value: Any) -> bool:
    return isinstance(value, float) and value.is_integer() and abs(value) >= MAX_SAFE_NUMBER


def _rounded(text: bytes, *, line: bool) -> list[bool] | None:
    """Which events of a JSON body (or of one NDJSON line) hold an integer beyond 64 bits.

    Only for bodies with a run of 19 digits (rare), re-read by the standard library, which
    hands every integer literal to `_int_or_big`. None: it could not say (nesting deeper
    than its recursion allows), and the caller refuses events with integral floats that big.
    """
    try:
        doc = json.loads(text, parse_int=_int_or_big)
    except (RecursionError, ValueError):
        return None
    if line:
        return [_any_leaf(doc, _is_big)]
    events = doc.get("events") if isinstance(doc, dict) else doc
    return [_any_leaf(event, _is_big) for event in events] if isinstance(events, list) else None


def _refuse_big_integers(batch: ParsedBatch, text: bytes, first: int, count: int, *, line: bool = False) -> None:
    """Refuse events `first..first+count-1` that were written with an integer beyond 64 bits."""
    if not _has_long_digits(text):
        return
    flags = _rounded(text, line=line)
    for offset in range(count):
        index = first + offset
        if batch.events[index] is UNPARSABLE:
            continue
        if flags is not None and len(flags) == count:
            big = flags[offset]
        else:
            big = _any_leaf(batch.events[index], _integral_giant)
        if big:
            batch.refuse(index, BIG_INTEGER, "properties")


def _unknown_top_level(doc: dict[str, Any], unknown: set[str]) -> str:
    """The 400's detail; a body without "events" whose unknown fields are event fields is one bare
    event, so it is told how to wrap it."""
    detail = f"unknown top-level field(s): {', '.join(sorted(unknown)[:5])}"
    if "events" not in doc and unknown & KNOWN_FIELDS:
        detail += '; to send one event, wrap it in [...] or {"events": [...]}'
    return detail


def _read_native(body: bytes, limits: EventLimits, *, lazy: bool) -> tuple[list[Any], int | None] | None:
    """The short way (schemas.native.decode_native): the events and the `sent_at` (epoch ms) of a
    body whose every event has the right shape and sizes, read in compiled code (`lazy`: its
    outline only, the events left raw). None: read it the general way, which explains what is
    wrong. msgspec reads every integer exactly and its types refuse one beyond 64 bits, so such a
    body goes the general way too, which names it as before."""
    native = decode_native(body, limits, lazy=lazy)
    if native is None:
        return None
    events, sent_at = native
    try:
        return events, None if sent_at is None else parse_sent_at(sent_at)
    except ValueError:
        return None


def _parse_json(body: bytes, max_events: int) -> ParsedBatch:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if isinstance(doc, list):
        batch = ParsedBatch(doc)
    elif isinstance(doc, dict):
        unknown = doc.keys() - {"events", "sent_at"}
        if unknown:
            raise BadRequest(_unknown_top_level(doc, unknown))
        events = doc.get("events")
        if not isinstance(events, list):
            raise BadRequest('body must be {"events": [...]}, a JSON array of events, or NDJSON')
        sent_at = doc.get("sent_at")
        try:
            sent_at_ms = None if sent_at is None else parse_sent_at(sent_at)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        batch = ParsedBatch(events, sent_at_ms=sent_at_ms)
    else:
        raise BadRequest('body must be {"events": [...]}, a JSON array of events, or NDJSON')
    if len(batch.events) > max_events:  # the 413 before a look for big integers, which may re-read it all
        raise _too_many(len(batch.events), max_events)
    _refuse_big_integers(batch, body, 0, len(batch.events))
    return batch


def _parse_ndjson(body: bytes) -> ParsedBatch:
    batch = ParsedBatch([])
    for line in body.split(b"\n"):
        if not line.strip():
            continue
        try:
            batch.events.append(orjson.loads(line))
        except orjson.JSONDecodeError as exc:
            batch.line_errors[len(batch.events)] = f"line is not valid JSON: {exc}"
            batch.events.append(UNPARSABLE)
            continue
        _refuse_big_integers(batch, line, len(batch.events) - 1, 1, line=True)
    return batch
