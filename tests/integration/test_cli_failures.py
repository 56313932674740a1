"""How operator commands fail, run as an operator runs them: the real `tally` in a process of its
own, configured only by the TALLY_* variables each test sets (no `.tally/env` of a running `tally
dev` is read), against real servers, a port nothing listens on, a database that does not exist.

Whatever goes wrong is ONE line on stderr, `tally <command>: <reason>`, within a deadline, with
the exit status README's Commands documents: 1 failed (the line says what to fix), 4 a server
did not answer (the same command may work later).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from aiokafka import TopicPartition
from sqlalchemy.engine import make_url

from core import devstack, kafka
from core.backup import FORMAT, MANIFEST
from core.cli import run_bounded
from core.settings import Settings
from tests.integration.consumer_helpers import make_events, produce
from tests.servers import Servers

pytestmark = pytest.mark.integration

TALLY = Path(sys.executable).with_name("tally")
FAILED, UNAVAILABLE = 1, 4
# Beside a rollups file that declares none, `tally retention` has nothing to do and talks to no one.
KEEPS_30D = '[[rollup]]\nname = "by_type"\ndimensions = ["type"]\nmeasures = ["count"]\nretention = "30d"\n'


@dataclass
class Run:
    code: int
    out: str
    err: str
    seconds: float

    def one_line(self, command: str) -> str:
        """The failure's line, after checking it is the only one and reads as one."""
        lines = self.err.splitlines()
        assert len(lines) == 1, self.err
        line = lines[0]
        assert line.startswith(f"tally {command}: "), line
        for raw in ("Traceback", "sqlalche.me", "[SQL:", "Background on this error", "asyncpg.", "aiokafka."):
            assert raw not in line, line
        return line


def env_of(settings: Settings, cwd: Path, **tally: str | None) -> dict[str, str]:
    """Only what a person would export: the servers, topics, group and partitions of `settings`
    (or `tally` overrides; None unsets). TALLY_DEV_DIR and the cwd are a directory with no `.tally/env`."""
    chosen: dict[str, str | None] = {
        "KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "POSTGRES_URL": settings.postgres_url,
        "TOPIC": settings.topic,
        "DLQ_TOPIC": settings.dlq_topic,
        "CONSUMER_GROUP": settings.consumer_group,
        "TOPIC_PARTITIONS": str(settings.topic_partitions),
        "ENV": "test",
        "DEV_DIR": str(cwd),
    } | {k.upper(): v for k, v in tally.items()}
    return {"PATH": os.environ["PATH"]} | {f"TALLY_{k}": v for k, v in chosen.items() if v is not None}


async def tally(env: dict[str, str], cwd: Path, *args: str, timeout: float = 60.0) -> Run:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(TALLY), *args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"tally {' '.join(args)} still running after {timeout} s") from None
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode(), time.monotonic() - started)


def fake_backup(directory: Path, settings: Settings) -> Path:
    """What `tally restore` reads before it connects: a manifest (with an offset of the consumers'
    group, so that the Kafka check has something to check) beside a dump directory."""
    (directory / "db").mkdir(parents=True)
    offsets = [{"group_id": settings.consumer_group, "topic": settings.topic, "partition": 0, "next_offset": 0}]
    manifest = {"format": FORMAT, "pg_dump": {"major": 15}, "tables": {}, "offsets": offsets}
    (directory / MANIFEST).write_text(json.dumps(manifest))
    return directory


DOWN_CASES = [
    ("postgres", "migrate"),
    ("postgres", "backfill events_by_type"),
    ("postgres", "dlq replay"),
    ("postgres", "dlq replay --dry-run"),
    ("postgres", "retention"),
    ("postgres", "retention --dry-run"),
    ("postgres", "backup {tmp}/new-backup"),
    ("postgres", "restore {backup}"),
    ("postgres", "keys create --name etl --scope ingest"),
    ("postgres", "keys list"),
    ("postgres", "keys revoke 0123456789ab"),
    ("kafka", "migrate"),
    ("kafka", "backfill events_by_type"),
    ("kafka", "backfill events_by_type --since -1h"),
    ("kafka", "dlq inspect"),
    ("kafka", "dlq inspect --json --since -1h"),
    ("kafka", "dlq replay"),
    ("kafka", "dlq replay --dry-run"),
    ("kafka", "restore {backup} --check-only"),
]


@pytest.mark.parametrize(("down", "command"), DOWN_CASES)
async def test_a_server_that_does_not_answer_is_one_line_within_the_deadline(
    migrated: Settings, tmp_path: Path, down: str, command: str
) -> None:
    """Everything else is up (a migrated database, the topics): only `down` is a port nothing listens on."""
    dead = f"127.0.0.1:{devstack.free_port()}"
    rollups = tmp_path / "rollups.toml"
    rollups.write_text(KEEPS_30D)
    args = command.format(tmp=tmp_path, backup=fake_backup(tmp_path / "backup", migrated)).split()
    if down == "postgres":
        url = make_url(str(migrated.postgres_url)).set(host="127.0.0.1", port=int(dead.split(":")[1]))
        override = {"postgres_url": url.render_as_string(hide_password=False)}
    else:
        override = {"kafka_bootstrap": dead}
    if args[0] == "retention":
        override["rollups_file"] = str(rollups)
    run = await tally(env_of(migrated, tmp_path, **override), tmp_path, *args)
    name = " ".join(args[:2]) if args[0] in ("dlq", "keys") else args[0]
    line = run.one_line(name)
    assert run.code == UNAVAILABLE, line
    assert run.seconds < 20, (run.seconds, line)
    assert (f"Postgres at {dead}" if down == "postgres" else f"Kafka at {dead}") in line, line
    assert "did not answer" in line and f"TALLY_{'POSTGRES_URL' if down == 'postgres' else 'KAFKA_BOOTSTRAP'}" in line


async def test_an_empty_dlq_is_an_empty_answer_at_once(migrated: Settings, tmp_path: Path) -> None:
    """aiokafka 0.14's consumer hung for ever in `stop()` after `unsubscribe()` on an empty topic."""
    env = env_of(migrated, tmp_path)
    cases = {
        ("dlq", "inspect"): f"{migrated.dlq_topic}: 0 dead letter(s); the last 0, oldest first\n",
        ("dlq", "inspect", "--json"): "",
        ("dlq", "inspect", "--since", "-1h"): f"{migrated.dlq_topic}: 0 dead letter(s) since ",
        ("dlq", "replay", "--dry-run"): (
            f"would replay 0 dead letter(s) from {migrated.dlq_topic} to {migrated.topic} (offsets none)\n"
        ),
    }
    for args, out in cases.items():
        run = await tally(env, tmp_path, *args, timeout=30)
        assert (run.code, run.err) == (0, ""), (args, run)
        assert run.out.startswith(out) and run.out.count("\n") == (1 if out else 0), (args, run.out)
        assert run.seconds < 10, (args, run.seconds)


async def test_a_database_that_does_not_exist_says_how_to_create_it(migrated: Settings, tmp_path: Path) -> None:
    name = f"tally_missing_{uuid.uuid4().hex[:8]}"
    url = make_url(str(migrated.postgres_url))
    env = env_of(migrated, tmp_path, postgres_url=url.set(database=name).render_as_string(hide_password=False))
    backup = fake_backup(tmp_path / "backup", migrated)
    for args in (("restore", str(backup)), ("keys", "list"), ("migrate",), ("retention", "--dry-run")):
        extra = {"TALLY_ROLLUPS_FILE": str(tmp_path / "r.toml")} if args[0] == "retention" else {}
        (tmp_path / "r.toml").write_text(KEEPS_30D)
        run = await tally(env | extra, tmp_path, *args)
        line = run.one_line(" ".join(args[:2]) if args[0] == "keys" else args[0])
        assert run.code == FAILED, line
        assert f'database "{name}" does not exist on {url.host}:{url.port}' in line, line
        createdb = line.split("create it with `", 1)[1].split("`", 1)[0].split()
        assert Path(createdb[0]).name == "createdb" and Path(createdb[0]).is_file(), line
        assert createdb[1:] == ["-h", str(url.host), "-p", str(url.port), "-U", str(url.username), name], line
        assert f'CREATE DATABASE "{name}"' in line, line

    # The way it gives works.
    created = subprocess.run(createdb, capture_output=True, text=True, timeout=30, check=False)
    assert created.returncode == 0, created.stderr
    conn = await asyncpg.connect(make_url(str(migrated.postgres_url)).set(drivername="postgresql")
                                 .render_as_string(hide_password=False))
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 1
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.mark.parametrize("command", ["retention --dry-run", "retention", "migrate", "backfill by_type", "consume"])
async def test_a_bad_rollups_file_is_one_line_naming_the_file_the_rollup_and_what_is_accepted(
    migrated: Settings, tmp_path: Path, command: str
) -> None:
    rollups = tmp_path / "rollups.toml"
    rollups.write_text(KEEPS_30D.replace('"30d"', '"3 months"'))
    run = await tally(env_of(migrated, tmp_path, rollups_file=str(rollups)), tmp_path, *command.split(), timeout=30)
    line = run.one_line(command.split()[0])
    assert run.code == FAILED, line
    assert str(rollups) in line and "rollup 'by_type'" in line and "'3 months'" in line, line
    assert "'90d' or '36h'" in line, line


async def test_a_missing_table_says_run_migrate(settings: Settings, tmp_path: Path) -> None:
    """`settings`: a database that exists, never migrated; the topics do."""
    await kafka.ensure_topics(settings)
    run = await tally(env_of(settings, tmp_path), tmp_path, "dlq", "replay", "--dry-run")
    line = run.one_line("dlq replay")
    assert run.code == FAILED and "tally_offsets" in line and "run `tally migrate`" in line, line


async def test_backfill_whose_postgres_connection_dies_mid_run_is_one_line(
    migrated: Settings, tmp_path: Path
) -> None:
    """The backfill waits for consumers that never come; its Postgres connection is killed meanwhile
    (as when the `tally dev` that ran the consumers and the database stops): one line, not
    SQLAlchemy's `[SQL: SELECT partition, start_offset FROM tally_rollup_starts ...]`."""
    env = env_of(migrated, tmp_path)
    proc = asyncio.create_task(tally(env, tmp_path, "backfill", "events_by_type", "--wait", "30", timeout=60))
    admin = await asyncpg.connect(str(migrated.postgres_url))
    try:
        killed = 0
        deadline = time.monotonic() + 20
        while not killed and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            killed = len(await admin.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'tally-backfill'"
            ))
        assert killed, "the backfill never connected"
    finally:
        await admin.close()
    run = await proc
    line = run.one_line("backfill")
    assert run.code == UNAVAILABLE and "Postgres at" in line and "closed the connection" in line, line


async def test_restore_without_kafka_says_the_check_was_skipped_and_how_to_run_it(
    servers: Servers, migrated: Settings, tmp_path: Path
) -> None:
    env = env_of(migrated, tmp_path)
    await produce(migrated, [(0, e) for e in make_events(3, random.Random(3))])
    async with asyncpg.create_pool(str(migrated.postgres_url), min_size=1, max_size=1) as pool:
        await pool.execute(
            "INSERT INTO tally_offsets (group_id, topic, partition, next_offset) VALUES ($1, $2, 0, 2)",
            migrated.consumer_group, migrated.topic,
        )
    backup = tmp_path / "backup"
    made = await tally(env, tmp_path, "backup", str(backup))
    assert made.code == 0, made

    admin = make_url(servers.postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"tally_restored_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    try:
        restored = make_url(admin).set(database=name).render_as_string(hide_password=False)
        run = await tally(env_of(migrated, tmp_path, postgres_url=restored, kafka_bootstrap=None), tmp_path,
                          "restore", str(backup))
        assert run.code == 0 and "row counts checked" in run.out, run
        assert run.err.splitlines() == [
            "warning: not checked that Kafka still holds the records after the restored offsets: "
            f"TALLY_KAFKA_BOOTSTRAP is not set; set it and run `tally restore {backup} --check-only`"
        ], run.err

        # The check, run as the warning says: Kafka still holds partition 0 from offset 0.
        check = await tally(env_of(migrated, tmp_path, postgres_url=restored), tmp_path,
                            "restore", str(backup), "--check-only")
        assert (check.code, check.err) == (0, ""), check
        assert check.out.startswith("start the consumers"), check.out
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def test_a_stop_that_hangs_is_abandoned_and_holds_no_process(migrated: Settings) -> None:
    """aiokafka issue 983, for real: `unsubscribe()` then `stop()` with no fetch in flight, on an
    empty topic, hangs for ever. `kafka.stop` gives up after its deadline, and `run_bounded` (the
    CLI's runner, in a thread of its own here) returns with the stuck task abandoned."""

    async def scenario() -> float:
        consumer = kafka.consumer(migrated, group_id=None, client_id="tally-test-stop")
        await kafka.within(migrated, consumer.start(), "connecting")
        await consumer._client.force_metadata_update()
        consumer.assign([TopicPartition(migrated.dlq_topic, p) for p in range(migrated.topic_partitions)])
        await consumer.getmany(timeout_ms=500)
        consumer.unsubscribe()
        started = time.monotonic()
        await kafka.stop(consumer, seconds=2.0)
        return time.monotonic() - started

    started = time.monotonic()
    stopped_in = await asyncio.to_thread(run_bounded, scenario(), 1.0)
    assert stopped_in < 4 and time.monotonic() - started < 15, stopped_in
