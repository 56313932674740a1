"""The body rules behind the hostile-input tests, without servers: the deadline for a body,
a client that leaves mid-body, and integers beyond 64 bits that orjson would round."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
from starlette.requests import ClientDisconnect

from core.problems import BadRequest, PayloadTooLarge
from ingest.body import BIG_INTEGER, UNPARSABLE, RequestTimeout, parse_batch, read_body


async def stalling(first: bytes) -> AsyncIterator[bytes]:
    yield first
    await asyncio.sleep(3600)
    yield b"never"


async def trickling(pause: float) -> AsyncIterator[bytes]:
    while True:
        await asyncio.sleep(pause)
        yield b" "


async def leaving(first: bytes) -> AsyncIterator[bytes]:
    yield first
    raise ClientDisconnect


async def test_a_stalled_or_trickling_body_times_out_at_the_deadline() -> None:
    for chunks in (stalling(b"[{"), trickling(0.01)):
        started = time.monotonic()
        with pytest.raises(RequestTimeout, match=r"within 0\.3 s") as caught:
            await read_body(chunks, content_length=None, encoding="", limit=1 << 20, deadline_seconds=0.3)
        assert 0.25 < time.monotonic() - started < 2.0
        assert caught.value.status == 408
        assert caught.value.headers == {"Connection": "close"}


async def test_a_client_that_leaves_is_a_client_error_and_a_lying_length_is_refused_unread() -> None:
    with pytest.raises(BadRequest, match="closed the connection"):
        await read_body(leaving(b"[{"), content_length=None, encoding="", limit=100, deadline_seconds=5)
    with pytest.raises(PayloadTooLarge) as caught:
        await read_body(stalling(b""), content_length=101, encoding="", limit=100, deadline_seconds=5)
    assert caught.value.headers == {"Connection": "close"}


@pytest.mark.parametrize(
    ("literal", "refused"),
    [
        ("9223372036854775807", False),  # 2^63 - 1
        ("-9223372036854775807", False),
        ("9223372036854775808", True),  # 2^63: an int to orjson, refused by the rule
        ("-9223372036854775808", True),
        ("-9223372036854775809", True),  # a float to orjson
        ("18446744073709551616", True),  # 2^64: a float to orjson
        ("1" * 5000, True),  # no int() of 5000 digits
        ("1e20", False),  # a float as written: kept
        ("100000000000000000000.0", False),
        ('"123456789012345678901234567890"', False),  # digits in a string
    ],
)
@pytest.mark.parametrize("form", ["object", "array", "ndjson"])
def test_integers_beyond_64_bits_are_refused_never_rounded(literal: str, refused: bool, form: str) -> None:
    if literal == "1" * 5000 and form != "ndjson":
        literal = "1" * 300  # orjson reads 5000 digits as infinity: a 400 for the whole JSON body
    event = f'{{"type":"a","properties":{{"n":{literal}}}}}'
    other = '{"type":"b","properties":{"n":12345678901234567}}'
    if form == "ndjson":
        body, kind = f"{other}\n{event}\n{other}".encode(), "application/x-ndjson"
    elif form == "array":
        body, kind = f"[{other},{event},{other}]".encode(), "application/json"
    else:
        decoy = '{"type":"x","properties":{"n":99999999999999999999999}}'
        body, kind = f'{{"events":[{decoy}],"events":[{other},{event},{other}]}}'.encode(), "application/json"
    if literal == "1" * 5000:
        batch = parse_batch(body, kind, max_events=10)
        assert batch.events[1] is UNPARSABLE and "not valid JSON" in batch.line_errors[1]
        return
    batch = parse_batch(body, kind, max_events=10)
    assert batch.events[0] == batch.events[2] == {"type": "b", "properties": {"n": 12345678901234567}}
    if refused:
        assert batch.events[1] is UNPARSABLE
        assert batch.line_errors == {1: BIG_INTEGER} and batch.reasons == {1: "properties"}
    else:
        assert batch.events[1]["properties"]["n"] == json.loads(literal)
        assert batch.line_errors == {}


def test_too_deep_for_the_standard_library_refuses_only_integral_giants() -> None:
    """orjson admits 1024 levels, the standard library's reader fewer: then floats that could be
    rounded integers (integral, |x| >= 2^63) are refused too, everything else is kept."""
    deep = "[" * 1000 + "1" + "]" * 1000
    body = (
        f'[{{"type":"a","properties":{{"n":18446744073709551616}}}},'
        f'{{"type":"b","properties":{{"d":{deep}}}}},'
        f'{{"type":"c","properties":{{"n":1e20}}}},'
        f'{{"type":"d","properties":{{"n":0.5}}}}]'
    ).encode()
    batch = parse_batch(body, "application/json", max_events=10)
    assert [e is UNPARSABLE for e in batch.events] == [True, False, True, False]
