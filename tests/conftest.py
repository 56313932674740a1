"""Fixtures: real servers for the session, a fresh database, topic and key prefix per test."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy.engine import make_url

from core import devstack
from core.migrate import migrate
from core.settings import Settings
from tests.servers import Servers, test_servers


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    with test_servers() as s:
        yield s


def _plain_pg(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
async def database_url(servers: Servers) -> AsyncIterator[str]:
    """A database of its own for each test, dropped afterwards."""
    admin_url = _plain_pg(servers.postgres_url)
    name = f"tally_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def settings(servers: Servers, database_url: str) -> Settings:
    """Settings for one test: its own topic, group, database and Redis key prefix."""
    tag = uuid.uuid4().hex[:10]
    return Settings(
        env="test",
        kafka_bootstrap=servers.kafka_bootstrap,
        postgres_url=database_url,
        redis_url=servers.redis_url,
        topic=f"tally.events.{tag}",
        dlq_topic=f"tally.events.{tag}.dlq",
        topic_partitions=4,
        consumer_group=f"tally-{tag}",
        cache_prefix=f"tally-{tag}:",
        session_timeout_ms=6_000,
        heartbeat_interval_ms=500,
        batch_max_wait_ms=100,
        produce_timeout_seconds=5.0,
        auth=False,  # tests of auth turn it on: settings.model_copy(update={"auth": True})
        drain_seconds=0,  # stopping a process is not a rolling deploy; the drain test sets its own
        log_format="text",
    )


@pytest.fixture
async def migrated(settings: Settings) -> Settings:
    await migrate(settings)
    return settings


@contextlib.asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    """Run an app under a real uvicorn server on a free port; yield its base URL and the server
    (whose open connections a test may count)."""
    port = devstack.free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn exited before it started")
        await asyncio.sleep(0.01)
    # Ingest connects its producer in the background and answers 503 until then (tested on its
    # own); give it up to 3 s, so that a test's first request does not race it.
    writer = getattr(app.state, "writer", None)
    for _ in range(300):
        if writer is None or writer.producer is not None:
            break
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[str]:
    """Run an app under a real uvicorn server on a free port; yield its base URL."""
    async with serving(app) as (url, _):
        yield url
