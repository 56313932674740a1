"""Private servers for the fault tests: each test stops, freezes or kills its own, never the session's."""

from __future__ import annotations

import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import devstack


@pytest.fixture
def private_postgres() -> Iterator[devstack.EmbeddedServer]:
    """Not under pytest's tmp_path: a pytest session starting meanwhile (a parallel run) makes
    /tmp/pytest-of-<user> private again, and Postgres, running as its own user when the tests
    run as root, could then not restart."""
    with tempfile.TemporaryDirectory(prefix="tally-fault-pg-") as tmp:
        server = devstack.postgres(Path(tmp) / "pg" / "data", devstack.free_port(), durable=False).start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def private_redis() -> Iterator[devstack.EmbeddedServer]:
    server = devstack.redis(devstack.free_port()).start()
    yield server
    server.kill()


@pytest.fixture
def private_broker() -> Iterator[devstack.EmbeddedServer]:
    """A Tansu broker of the test's own (memory only). Thawed before it is stopped, in case a
    failing test left it frozen with SIGSTOP."""
    server = devstack.kafka(devstack.free_port()).start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)
    server.stop()
