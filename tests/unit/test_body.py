"""Body decoding: the decoded-size limit holds while inflating, and the three forms parse."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import AsyncIterator

import pytest

from core.problems import BadRequest, PayloadTooLarge, UnsupportedMediaType
from ingest.body import UNPARSABLE, BoundedBody, parse_batch, read_body


async def chunks(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def test_plain_body_at_and_over_limit() -> None:
    assert await read_body(chunks(b"x" * 100), content_length=None, encoding="", limit=100) == b"x" * 100
    with pytest.raises(PayloadTooLarge, match="limit of 100 bytes"):
        await read_body(chunks(b"x" * 101), content_length=None, encoding="", limit=100)
    with pytest.raises(PayloadTooLarge):
        await read_body(chunks(b""), content_length=101, encoding="", limit=100)


async def test_gzip_at_and_over_limit() -> None:
    data = b"y" * 1000
    assert await read_body(chunks(gzip.compress(data)), content_length=None, encoding="gzip", limit=1000) == data
    with pytest.raises(PayloadTooLarge):
        await read_body(chunks(gzip.compress(data + b"y")), content_length=None, encoding="gzip", limit=1000)


def test_gzip_bomb_stops_at_the_limit() -> None:
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    payload = bomb.compress(b"\0" * (200 * 1024 * 1024)) + bomb.flush()
    assert len(payload) < 300_000
    body = BoundedBody(5 * 1024 * 1024, gzip=True)
    with pytest.raises(PayloadTooLarge):
        for i in range(0, len(payload), 65536):
            body.feed(payload[i : i + 65536])
    # Never held more than the limit (+1 byte of probe) of decoded data.
    assert body._size <= 5 * 1024 * 1024 + 1


async def test_multi_member_gzip_and_bad_gzip() -> None:
    two = gzip.compress(b"ab") + gzip.compress(b"cd")
    assert await read_body(chunks(two, 5), content_length=None, encoding="gzip", limit=10) == b"abcd"
    with pytest.raises(BadRequest, match="not valid gzip"):
        await read_body(chunks(b"not gzip at all"), content_length=None, encoding="gzip", limit=100)
    with pytest.raises(BadRequest, match="truncated"):
        await read_body(chunks(gzip.compress(b"abc" * 100)[:-10]), content_length=None, encoding="gzip", limit=1000)
    with pytest.raises(UnsupportedMediaType, match="br"):
        await read_body(chunks(b""), content_length=None, encoding="br", limit=10)


def test_three_body_forms() -> None:
    assert parse_batch(b'{"events":[{"type":"a"}]}', "application/json", max_events=10).events == [{"type": "a"}]
    assert parse_batch(b'[{"type":"a"},1]', "application/json; charset=utf-8", max_events=10).events == [
        {"type": "a"}, 1
    ]
    nd = parse_batch(b'{"type":"a"}\n\n{bad\n{"type":"b"}\n', "application/x-ndjson", max_events=10)
    assert nd.events[0] == {"type": "a"} and nd.events[1] is UNPARSABLE and nd.events[2] == {"type": "b"}
    assert list(nd.line_errors) == [1] and "not valid JSON" in nd.line_errors[1]


@pytest.mark.parametrize(
    ("body", "ctype", "exc", "words"),
    [
        (b"{", "application/json", BadRequest, "not valid JSON"),
        (b'{"events":[], "extra":1}', "application/json", BadRequest, "extra"),
        (b'{"events":{}}', "application/json", BadRequest, "must be"),
        (b'"x"', "application/json", BadRequest, "must be"),
        (b"a,b", "text/csv", UnsupportedMediaType, "text/csv"),
        (b"[" + b",".join([b"{}"] * 11) + b"]", "application/json", PayloadTooLarge, "11 events; the limit is 10"),
    ],
)
def test_unsplittable_bodies(body: bytes, ctype: str, exc: type[Exception], words: str) -> None:
    with pytest.raises(exc, match=words):
        parse_batch(body, ctype, max_events=10)
