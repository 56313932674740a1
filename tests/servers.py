"""Where the tests' real servers come from: environment URLs, testcontainers, or embedded.

Order (DESIGN §9): `TALLY_TEST_{KAFKA_BOOTSTRAP,POSTGRES_URL,REDIS_URL}` where set;
testcontainers where `TALLY_TEST_DOCKER=1` asks for them; otherwise the embedded
servers that `tally dev` uses.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from core import devstack


@dataclass
class Servers:
    kafka_bootstrap: str
    postgres_url: str  # an admin database; each test gets its own database beside it
    redis_url: str
    embedded: dict[str, devstack.EmbeddedServer]


def _docker(stack: ExitStack, kind: str) -> str:
    from testcontainers.kafka import KafkaContainer
    from testcontainers.postgres import PostgresContainer
    from testcontainers.redis import RedisContainer

    if kind == "kafka":
        k = stack.enter_context(KafkaContainer("apache/kafka:3.9.0").with_kraft())
        return str(k.get_bootstrap_server())
    if kind == "postgres":
        p = stack.enter_context(PostgresContainer("postgres:17", driver=None))
        return str(p.get_connection_url())
    r = stack.enter_context(RedisContainer("redis:7"))
    return f"redis://{r.get_container_host_ip()}:{r.get_exposed_port(6379)}/0"


@contextmanager
def test_servers() -> Iterator[Servers]:
    use_docker = os.environ.get("TALLY_TEST_DOCKER") == "1"
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tally-test-")))
        embedded: dict[str, devstack.EmbeddedServer] = {}

        def pick(env: str, kind: str) -> str:
            if os.environ.get(env):
                return os.environ[env]
            if use_docker:
                return _docker(stack, kind)
            if kind == "kafka":
                server = devstack.kafka(devstack.free_port())
            elif kind == "postgres":
                server = devstack.postgres(tmp / "pg" / "data", devstack.free_port(), durable=False)
            else:
                server = devstack.redis(devstack.free_port())
            server.start()
            stack.callback(server.stop)
            embedded[kind] = server
            return server.url

        yield Servers(
            kafka_bootstrap=pick("TALLY_TEST_KAFKA_BOOTSTRAP", "kafka"),
            postgres_url=pick("TALLY_TEST_POSTGRES_URL", "postgres"),
            redis_url=pick("TALLY_TEST_REDIS_URL", "redis"),
            embedded=embedded,
        )
