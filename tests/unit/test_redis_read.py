"""The pipelined reader's RESP parsing (pure): every reply kind, split anywhere, and garbage refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import ResponseError

from core.redis_read import ProtocolError, command, parse

MGET_REPLY = b"*3\r\n$5\r\nhello\r\n$-1\r\n$0\r\n\r\n"


def test_command_is_an_array_of_bulk_strings() -> None:
    assert command("MGET", "a", b"b\r\n") == b"*3\r\n$4\r\nMGET\r\n$1\r\na\r\n$3\r\nb\r\n\r\n"


def test_replies() -> None:
    assert parse(MGET_REPLY) == ([b"hello", None, b""], len(MGET_REPLY))
    assert parse(b"+OK\r\n") == ("OK", 5)
    assert parse(b":42\r\n") == (42, 5)
    assert parse(b"$-1\r\n") == (None, 5)
    assert parse(b"*0\r\n") == ([], 4)
    error, end = parse(b"-ERR wrong\r\n") or (None, 0)
    assert isinstance(error, ResponseError) and str(error) == "ERR wrong" and end == 12
    assert parse(b"$3\r\nabc\r\n+OK\r\n", 9) == ("OK", 14)  # from a position: pipelined replies


@given(st.lists(st.one_of(st.none(), st.binary(max_size=40)), max_size=5), st.data())
def test_an_incomplete_reply_waits_for_the_rest(values: list[bytes | None], data: st.DataObject) -> None:
    items = (b"$-1\r\n" if v is None else b"$%d\r\n%s\r\n" % (len(v), v) for v in values)
    raw = b"*%d\r\n" % len(values) + b"".join(items)
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert parse(raw[:cut]) is None
    assert parse(raw) == (values, len(raw))


@pytest.mark.parametrize("garbage", [b"?what\r\n", b"$x\r\n", b"*y\r\n", b":1.5\r\n"])
def test_garbage_is_a_protocol_error(garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse(garbage)
