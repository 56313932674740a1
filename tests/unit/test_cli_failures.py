"""The CLI's one way to fail (core.cli.explain) and its bounded runner, without servers: the
exceptions are the drivers' own classes, built as the drivers raise them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import asyncpg
import pytest
from aiokafka.errors import KafkaConnectionError
from sqlalchemy import exc as sa_errors
from sqlalchemy.exc import DBAPIError

from core.cli import EXIT_FAILED, EXIT_UNAVAILABLE, explain, run_bounded
from core.kafka import Unanswered
from core.settings import Settings, SettingsError
from schemas.rollups import RollupSpecError

SETTINGS = Settings(
    env="test", kafka_bootstrap="broker:9092", postgres_url="postgresql://ops:pw@db.example:6543/tally",
    rollups_file=Path("/etc/tally/rollups.toml"),
)


def wrapped(orig: BaseException, *, invalidated: bool = False) -> DBAPIError:
    """As SQLAlchemy raises a driver's error: its wrapper, with the driver's error as `orig`."""
    try:
        raise DBAPIError("SELECT partition, start_offset FROM tally_rollup_starts", {}, orig,
                         connection_invalidated=invalidated) from orig
    except DBAPIError as exc:
        return exc


def test_a_missing_database_names_the_command_that_creates_it() -> None:
    code, line = explain(wrapped(asyncpg.InvalidCatalogNameError('database "tally" does not exist')), SETTINGS)
    assert code == EXIT_FAILED
    assert line.startswith('database "tally" does not exist on db.example:6543: create it with `'), line
    assert "createdb -h db.example -p 6543 -U ops tally`" in line and 'CREATE DATABASE "tally"' in line, line


@pytest.mark.parametrize(
    ("exc", "code", "words"),
    [
        (RollupSpecError("rollup 'x': retention '3 months' must be like '90d' or '36h' (days or hours)"), EXIT_FAILED,
         "/etc/tally/rollups.toml (TALLY_ROLLUPS_FILE): rollup 'x': retention '3 months' must be like"),
        (SettingsError("set TALLY_POSTGRES_URL (or run `tally dev` for an embedded stack)"), EXIT_FAILED,
         "set TALLY_POSTGRES_URL"),
        (KafkaConnectionError("Unable to bootstrap from [('broker', 9092, <AddressFamily.AF_INET: 2>)]"),
         EXIT_UNAVAILABLE, "Kafka at broker:9092 did not answer: is it up, and is TALLY_KAFKA_BOOTSTRAP right?"),
        (Unanswered("Kafka at broker:9092 did not answer within 15 s (connecting)"), EXIT_UNAVAILABLE,
         "Kafka at broker:9092 did not answer within 15 s"),
        (wrapped(asyncpg.UndefinedTableError('relation "tally_offsets" does not exist')), EXIT_FAILED,
         'relation "tally_offsets" does not exist in database tally: run `tally migrate`'),
        (wrapped(asyncpg.InvalidPasswordError('password authentication failed for user "ops"')), EXIT_FAILED,
         "Postgres at db.example:6543 refused the login: password authentication failed"),
        (wrapped(asyncpg.CannotConnectNowError("the database system is starting up")), EXIT_UNAVAILABLE,
         "Postgres at db.example:6543: the database system is starting up: try again"),
        (wrapped(asyncpg.InterfaceError("connection is closed"), invalidated=True), EXIT_UNAVAILABLE,
         "Postgres at db.example:6543 closed the connection"),
        (FileNotFoundError(2, "No such file or directory", "/backups/x/tally-backup.json"), EXIT_FAILED,
         "/backups/x/tally-backup.json: No such file or directory"),
        (ValueError("a key needs a name of 1 to 200 characters"), EXIT_FAILED,
         "a key needs a name of 1 to 200 characters"),
        (KeyError("partition"), EXIT_FAILED, "KeyError: 'partition'"),
        (sa_errors.InvalidRequestError("this transaction is inactive", code="8s2b"), EXIT_FAILED,
         "InvalidRequestError: this transaction is inactive"),  # and not its link to SQLAlchemy's docs
        (sa_errors.TimeoutError("QueuePool limit of size 1 overflow 0 reached", code="3o7r"), EXIT_UNAVAILABLE,
         "Postgres at db.example:6543 did not give a connection in time"),
    ],
)
def test_every_failure_is_one_line_with_its_exit_status(exc: BaseException, code: int, words: str) -> None:
    got, line = explain(exc, SETTINGS)
    assert (got, "\n" in line) == (code, False), line
    assert words in line, line
    assert "sqlalche.me" not in line and "[SQL:" not in line and "asyncpg" not in line, line


def test_a_refused_connection_is_told_apart_by_which_client_raised_it() -> None:
    async def connect() -> None:
        await asyncpg.connect("postgresql://ops@127.0.0.1:1/tally", timeout=5)

    try:
        asyncio.run(connect())
    except OSError as exc:
        code, line = explain(exc, SETTINGS)
    assert code == EXIT_UNAVAILABLE, line
    assert line == (
        "Postgres at db.example:6543 did not answer (connection refused): is it up, and is TALLY_POSTGRES_URL right?"
    )


def test_the_runner_does_not_wait_for_a_task_that_ignores_its_cancellation() -> None:
    async def stubborn() -> None:
        while True:
            with contextlib.suppress(asyncio.CancelledError):  # as aiokafka 0.14's fetcher does (issue 983)
                await asyncio.sleep(10)

    async def main() -> int:
        asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0)
        return 7

    started = time.monotonic()
    assert run_bounded(main(), grace=0.2) == 7
    assert time.monotonic() - started < 2


def test_a_bad_setting_is_one_line_naming_the_variable_and_its_value() -> None:
    from pydantic import ValidationError

    from core.cli import configuration_error
    from core.settings import Settings

    with pytest.raises(ValidationError) as bad_int:
        Settings(max_events="abc", env="nope")  # type: ignore[arg-type]
    assert configuration_error(bad_int.value) == (
        "TALLY_ENV=nope: Input should be 'dev', 'test' or 'prod'; "
        "TALLY_MAX_EVENTS=abc: Input should be a valid integer, unable to parse string as an integer"
    )
    with pytest.raises(ValidationError) as across:
        Settings(default_limit=100_000)
    assert configuration_error(across.value) == "TALLY_DEFAULT_LIMIT (100000) is above TALLY_MAX_LIMIT (10000)"
