"""Reading a batch: bounded body decoding and the three body forms.

The decoded-size limit is enforced while decompressing, so a gzip bomb is
refused after reading at most `limit` decoded bytes, not after inflating it.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from core.problems import BadRequest, PayloadTooLarge, UnsupportedMediaType
from schemas.events import parse_sent_at

JSON_TYPES = frozenset({"application/json", ""})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl"})
# A raw event whose line could not be parsed: kept in place so indexes stay true.
UNPARSABLE = object()


@dataclass
class ParsedBatch:
    events: list[Any]
    line_errors: dict[int, str] = field(default_factory=dict)
    sent_at_ms: int | None = None  # the producer's clock when it sent the batch


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


async def read_body(chunks: AsyncIterator[bytes], *, content_length: int | None, encoding: str, limit: int) -> bytes:
    encoding = encoding.strip().lower()
    if encoding not in ("", "identity", "gzip", "x-gzip"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; use gzip or none")
    if content_length is not None and content_length > limit:
        raise PayloadTooLarge(f"body of {content_length} bytes exceeds the limit of {limit} bytes")
    body = BoundedBody(limit, gzip=encoding in ("gzip", "x-gzip"))
    async for chunk in chunks:
        body.feed(chunk)
    return body.finish()


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def parse_batch(body: bytes, content_type: str, *, max_events: int) -> ParsedBatch:
    """Split a body into raw events. Only a body that cannot be split at all is a 400."""
    kind = media_type(content_type)
    if kind in NDJSON_TYPES:
        batch = _parse_ndjson(body)
    elif kind in JSON_TYPES:
        batch = _parse_json(body)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {kind!r} is not supported; use application/json or application/x-ndjson"
        )
    if len(batch.events) > max_events:
        raise PayloadTooLarge(f"batch has {len(batch.events)} events; the limit is {max_events}")
    return batch


def _parse_json(body: bytes) -> ParsedBatch:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if isinstance(doc, list):
        return ParsedBatch(doc)
    if isinstance(doc, dict):
        unknown = doc.keys() - {"events", "sent_at"}
        if unknown:
            raise BadRequest(f"unknown top-level field(s): {', '.join(sorted(unknown)[:5])}")
        events = doc.get("events")
        if isinstance(events, list):
            sent_at = doc.get("sent_at")
            try:
                sent_at_ms = None if sent_at is None else parse_sent_at(sent_at)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
            return ParsedBatch(events, sent_at_ms=sent_at_ms)
    raise BadRequest('body must be {"events": [...]}, a JSON array of events, or NDJSON')


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
    return batch
