"""core.redis_read against a real Redis: pipelined MGETs, the URL's database, a killed connection,
and a server that stops answering (every waiter fails at the timeout, the next request reconnects)."""

from __future__ import annotations

import asyncio
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis

from core.redis_read import RedisReader
from tests.servers import Servers


def with_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


async def test_pipelined_mgets_answer_in_order(servers: Servers) -> None:
    tag = uuid.uuid4().hex
    redis = Redis.from_url(servers.redis_url)
    reader = RedisReader.from_url(servers.redis_url, connections=2)
    try:
        await redis.mset({f"{tag}:{i}": f"value {i}".encode() * (i % 7 * 300 + 1) for i in range(200)})
        replies = await asyncio.gather(*(reader.mget(f"{tag}:{i}", f"{tag}:missing") for i in range(200)))
        assert replies == [[f"value {i}".encode() * (i % 7 * 300 + 1), None] for i in range(200)]
    finally:
        await reader.close()
        await redis.delete(*[f"{tag}:{i}" for i in range(200)])
        await redis.aclose()


async def test_the_urls_database_is_selected(servers: Servers) -> None:
    tag = uuid.uuid4().hex
    url = with_db(servers.redis_url, 3)
    redis = Redis.from_url(url)
    reader = RedisReader.from_url(url)
    try:
        await redis.set(tag, b"in db 3")
        assert await reader.mget(tag) == [b"in db 3"]
        assert await RedisReader.from_url(with_db(servers.redis_url, 0)).mget(tag) == [None]
    finally:
        await reader.close()
        await redis.delete(tag)
        await redis.aclose()


async def test_a_killed_connection_is_replaced(servers: Servers) -> None:
    tag = uuid.uuid4().hex
    redis = Redis.from_url(servers.redis_url)
    reader = RedisReader.from_url(servers.redis_url, connections=1)
    try:
        await redis.set(tag, b"x")
        assert await reader.mget(tag) == [b"x"]
        ours = {c["id"] for c in await redis.client_list() if c["cmd"] == "mget"}
        assert ours
        for client_id in ours:
            await redis.client_kill_filter(_id=client_id)
        outcomes: list[object] = []
        for _ in range(3):  # a request in flight when the close arrives fails; the next one reconnects
            try:
                outcomes.append(await reader.mget(tag))
            except ConnectionError as exc:
                outcomes.append(type(exc))
            await asyncio.sleep(0.05)
        assert outcomes[-1] == [b"x"], outcomes
        now = {c["id"] for c in await redis.client_list() if c["cmd"] == "mget"}
        assert now and not now & ours  # answered on a new connection
    finally:
        await reader.close()
        await redis.delete(tag)
        await redis.aclose()


async def test_a_silent_server_costs_one_timeout_not_a_hang(servers: Servers) -> None:
    tag = uuid.uuid4().hex
    redis = Redis.from_url(servers.redis_url)
    reader = RedisReader.from_url(servers.redis_url, connections=1, timeout=0.2)
    try:
        await redis.set(tag, b"x")
        assert await reader.mget(tag) == [b"x"]
        await redis.execute_command("CLIENT", "PAUSE", "700", "ALL")  # reads wait, writes of this client too
        started = time.monotonic()
        outcomes = await asyncio.gather(*(reader.mget(tag) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(o, TimeoutError) for o in outcomes), outcomes
        assert time.monotonic() - started < 0.5  # one timeout for all of them, not five in a row
        await asyncio.sleep(0.7)
        assert await reader.mget(tag) == [b"x"]  # a new connection, once Redis answers again
    finally:
        await reader.close()
        await redis.execute_command("CLIENT", "UNPAUSE")
        await redis.delete(tag)
        await redis.aclose()
