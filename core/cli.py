"""The `tally` command. Services are named by module path, not imported, so `core`
keeps to the import rule and each service can be installed and run alone.

Every command fails the same way: one line on stderr, `tally <command>: <reason>`, the
reason saying what is wrong and what to do (`explain`), with an exit status from the
table in README's Commands. Operator commands (all but the services) run under
`run_bounded` and give every SQL statement a deadline: no server can hold them for ever.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import shlex
import shutil
import sys
import tempfile
import tomllib
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from core import devenv, logs, servers
from core.db import exception_chain
from core.settings import Settings, get_settings
from schemas.reltime import SPELLING, relative_seconds
from schemas.rollups import RollupSpecError

log = logging.getLogger("tally")
T = TypeVar("T")
SERVICES = ("dev", "ingest", "query", "consume")  # every other command is an operator's tool
# Exit statuses (README, Commands). 2 is argparse's, for a bad command line; 3 is `tally consume`'s
# when `tally migrate` registered other rollups (consumers.main).
EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 1, 4, 130
SQL_SECONDS = 300.0  # an operator tool's SQL statement still running after this is abandoned
_OURS = frozenset({"core", "consumers", "schemas", "query", "ingest"})
# Postgres down, restarting or full, or a statement that waited too long: the same command may work later.
_PG_TRANSIENT = frozenset({"57P01", "57P02", "57P03", "53300", "57014", "55P03", "40001", "40P01"})

# core.auth.SCOPES, spelled out: importing core.auth here would load core.metrics before
# `_prepare_multiprocess_metrics` has set up PROMETHEUS_MULTIPROC_DIR for the workers.
SCOPES = ("ingest", "query", "admin")


def _prepare_multiprocess_metrics(workers: int) -> None:
    """Workers share counters through files; the directory must exist and start empty."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path is None and workers > 1:
        path = tempfile.mkdtemp(prefix="tally-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)


def _serve(app_path: str, settings: Settings, port: int, workers: int, server: str | None) -> None:
    if server is not None:
        settings = settings.model_copy(update={"server": server})
    _prepare_multiprocess_metrics(workers)
    servers.serve(app_path, settings, port=port, workers=workers)


def _at_least_one(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _attach_relative_times(argv: Sequence[str]) -> list[str]:
    """`--since -1h` as `--since=-1h`: argparse would take `-1h` for an option and refuse it."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("--since", "--from") and relative_seconds(arg) is not None:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tally", description="Tally: event-streaming analytics API.")
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="run the whole pipeline on this machine (embedded servers where unset)")
    dev.add_argument("--demo", action="store_true", help="post realistic synthetic traffic")
    dev.add_argument("--demo-rate", type=int, default=500, help="demo events per second (default 500)")
    for name, what in (("ingest", "the ingest API"), ("query", "the query API")):
        p = sub.add_parser(name, help=f"run {what} against configured servers")
        p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
        p.add_argument(
            "--server",
            choices=servers.SERVERS,
            help=f"the HTTP server (default: TALLY_SERVER, else {servers.DEFAULT_SERVER}); only granian speaks HTTP/2",
        )
    consume = sub.add_parser("consume", help="run consumers of one group against configured servers")
    consume.add_argument(
        "--processes",
        type=_at_least_one,
        default=1,
        metavar="N",
        help="consumer processes under one supervisor, metrics on TALLY_CONSUMER_METRICS_PORT + i (default 1)",
    )
    sub.add_parser("migrate", help="create topics, the offsets table and every rollup table")
    backfill = sub.add_parser("backfill", help="fill a new rollup's past from the topic, exactly once")
    backfill.add_argument("rollup", help="the rollup's name in the rollups file")
    backfill.add_argument(
        "--from",
        "--since",
        dest="since",
        default=None,
        metavar="WHEN",
        help=f"earliest (default), ISO 8601 with an offset, or {SPELLING}",
    )
    backfill.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="seconds to wait for the consumers to apply the rollup once on every partition",
    )
    dlq = sub.add_parser("dlq", help="inspect the dead-letter topic, or replay dead letters after a fix")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    since_help = f"only dead letters written at or after WHEN: ISO 8601 with an offset, or {SPELLING}"
    inspect = dlq_sub.add_parser("inspect", help="print the last dead letters: where from, why, a value preview")
    inspect.add_argument("--limit", type=int, default=20, metavar="N", help="how many, newest (default 20)")
    inspect.add_argument("--since", metavar="WHEN", help=since_help)
    inspect.add_argument("--json", action="store_true", help="one JSON object per dead letter and line")
    replay = dlq_sub.add_parser(
        "replay", help="re-submit dead letters to the event topic; resumes where the last run stopped"
    )
    replay.add_argument("--since", metavar="WHEN", help=since_help + "; older ones are passed over for good")
    replay.add_argument("--dry-run", action="store_true", help="list what would be replayed; change nothing")
    replay.add_argument(
        "--include-replayed", action="store_true", help="also re-submit dead letters that came back from a replay"
    )
    retention = sub.add_parser("retention", help="delete buckets older than each rollup's retention, in short batches")
    retention.add_argument("--dry-run", action="store_true", help="count what would be deleted; delete nothing")
    backup = sub.add_parser(
        "backup", help="dump rollups, offsets, registry and keys from one consistent snapshot (pg_dump)"
    )
    backup.add_argument("directory", type=Path, help="a new or empty directory")
    backup.add_argument("--jobs", type=int, default=1, metavar="N", help="tables dumped in parallel (default 1)")
    restore = sub.add_parser("restore", help="restore a `tally backup` into an empty database and check it")
    restore.add_argument("directory", type=Path, help="a directory written by `tally backup`")
    restore.add_argument(
        "--jobs", type=int, default=1, metavar="N", help="parallel restore (default 1: one transaction, all or nothing)"
    )
    restore.add_argument(
        "--create", action="store_true", help="create the database first if it does not exist (as pg_restore -C)"
    )
    restore.add_argument(
        "--check-only",
        action="store_true",
        help="restore nothing: only check that Kafka still holds the records after the backup's offsets",
    )
    keys = sub.add_parser("keys", help="create, list and revoke API keys (needs TALLY_POSTGRES_URL)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it; it is shown only this once")
    create.add_argument("--name", required=True, help="who or what uses the key")
    create.add_argument(
        "--scope", action="append", required=True, choices=SCOPES, help="repeat for several; admin implies all"
    )
    create.add_argument(
        "--rate-limit", type=int, metavar="N", help="ingest events/s for this key (default: the setting)"
    )
    keys_sub.add_parser("list", help="list keys: id, name, scopes, rate limit, created, revoked (never secrets)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id; services refuse it within the auth cache time")
    revoke.add_argument("id", help="the key's id, from `tally keys list`")
    return parser


async def _retention(settings: Settings, dry_run: bool) -> None:
    from core import retention

    for warning in retention.short_retentions(settings):
        print(f"warning: {warning}", file=sys.stderr)
    report = await retention.run_retention(settings, dry_run=dry_run)
    print(retention.format_report(report, dry_run=dry_run))


async def _backup(settings: Settings, args: argparse.Namespace) -> None:
    from core import backup

    if args.command == "backup":
        manifest = await backup.backup(settings, args.directory, jobs=args.jobs)
        print(f"backed up into {args.directory}: " + backup.describe(manifest))
        return
    if args.check_only:
        manifest = backup.read_manifest(args.directory)
    else:
        manifest = await backup.restore(settings, args.directory, jobs=args.jobs, create=args.create)
        print(f"restored, row counts checked: {backup.describe(manifest)}")
    unchecked = "warning: not checked that Kafka still holds the records after the restored offsets"
    later = f"`tally restore {shlex.quote(str(args.directory))} --check-only`"
    if settings.kafka_bootstrap is None and not args.check_only:
        print(f"{unchecked}: TALLY_KAFKA_BOOTSTRAP is not set; set it and run {later}", file=sys.stderr)
        return
    try:
        gaps = await backup.replay_gaps(settings, manifest)
    except Exception as exc:
        if args.check_only:
            raise
        print(f"{unchecked} ({explain(exc, settings)[1]}): run {later} once it answers", file=sys.stderr)
        return
    for gap in gaps:
        print(f"warning: {gap}", file=sys.stderr)
    print("start the consumers: they resume from the restored offsets and count the rest from Kafka, once")


async def _keys(settings: Settings, args: argparse.Namespace) -> None:
    from core import keycmd

    if args.keys_command == "create":
        await keycmd.create(settings, args.name, args.scope, args.rate_limit)
    elif args.keys_command == "list":
        await keycmd.list_keys(settings)
    else:
        await keycmd.revoke(settings, args.id)


async def _operate(args: argparse.Namespace, settings: Settings) -> None:
    """An operator command: migrate, backfill, dlq, retention, backup, restore, keys."""
    if args.command == "migrate":
        from core.migrate import migrate

        await migrate(settings)
        tables = ", ".join(s.table for s in settings.rollups)
        print(f"migrated: topics {settings.topic} and {settings.dlq_topic}; tables {tables}")
    elif args.command == "backfill":
        tool = importlib.import_module("consumers.backfill")
        await tool.run(settings, args.rollup, args.since, args.wait)
    elif args.command == "dlq":
        tools = importlib.import_module("consumers.dlq_tools")
        if args.dlq_command == "inspect":
            await tools.inspect(settings, limit=args.limit, since=args.since, json_lines=args.json)
        else:
            await tools.replay_command(
                settings, since=args.since, dry_run=args.dry_run, include_replayed=args.include_replayed
            )
    elif args.command == "retention":
        await _retention(settings, args.dry_run)
    elif args.command in ("backup", "restore"):
        await _backup(settings, args)
    elif args.command == "keys":
        await _keys(settings, args)


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "dev":
        from core.devrun import run_dev

        asyncio.run(run_dev(settings, demo=args.demo, demo_rate=args.demo_rate))
    elif args.command == "ingest":
        auth = ("postgres_url",) if settings.auth else ()  # API keys live in Postgres
        settings.require("kafka_bootstrap", "redis_url", *auth)
        _serve("ingest.app:app_from_env", settings, settings.ingest_port, args.workers, args.server)
    elif args.command == "query":
        settings.require("kafka_bootstrap", "postgres_url", "redis_url")
        _serve("query.app:app_from_env", settings, settings.query_port, args.workers, args.server)
    elif args.command == "consume" and args.processes > 1:
        supervisor = importlib.import_module("consumers.supervise")
        return int(supervisor.supervise(settings, args.processes, [sys.executable, "-m", "core.cli", "consume"]))
    elif args.command == "consume":
        consumer = importlib.import_module("consumers.main")
        return int(consumer.serve(settings))
    else:
        _bound_sql(SQL_SECONDS)
        run_bounded(_operate(args, settings))
    return 0


def run_bounded(main: Coroutine[Any, Any, T], grace: float = 2.0) -> T:
    """`asyncio.run(main)`, except at the end: tasks still running once `main` returned or failed
    are cancelled and given `grace` seconds, then abandoned with the loop, so that a library task
    which ignores its cancellation (aiokafka issue 983) cannot hold the process."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        # What is abandoned here is not news ("Task was destroyed but it is pending!").
        loop.set_exception_handler(lambda _, context: log.debug("at exit: %s", context.get("message")))
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=grace))
        loop.run_until_complete(asyncio.wait({loop.create_task(loop.shutdown_asyncgens())}, timeout=grace))
        asyncio.set_event_loop(None)
        loop.close()


def _bound_sql(seconds: float) -> None:
    """A client-side deadline on every SQL statement of this process (asyncpg's command_timeout):
    a frozen or cut-off Postgres never enforces its own statement_timeout."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def deadline(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        cparams.setdefault("command_timeout", seconds)

    event.listen(Engine, "do_connect", deadline)


def _line(exc: BaseException) -> str:
    """The first line of an error's message, without SQLAlchemy's link to its docs."""
    text = str(exc).strip().splitlines()
    return text[0].split(" (Background on this error at:")[0] if text else type(exc).__name__


def _origin(exc: BaseException) -> str | None:
    """Which client raised `exc`, by the modules of its traceback: "postgres", "kafka" or None."""
    found = None
    tb = exc.__traceback__
    while tb is not None:
        top = str(tb.tb_frame.f_globals.get("__name__", "")).partition(".")[0]
        found = {"asyncpg": "postgres", "sqlalchemy": "postgres", "aiokafka": "kafka"}.get(top, found)
        tb = tb.tb_next
    return found


def _postgres(settings: Settings) -> tuple[str, dict[str, str]]:
    """Where Postgres is (`host:port`) and the URL's parts for a command line."""
    from sqlalchemy.engine import make_url

    if settings.postgres_url is None:
        return "(TALLY_POSTGRES_URL unset)", {}
    url = make_url(str(settings.postgres_url))
    host = url.host or str(url.query.get("host", "localhost"))
    parts = {"-h": host, "-p": str(url.port or 5432), "-U": url.username or "", "db": url.database or ""}
    return f"{host}:{url.port or 5432}", parts


def _postgres_error(state: str, message: str, settings: Settings) -> tuple[int, str]:
    where, parts = _postgres(settings)
    if state == "3D000":  # invalid catalog name: the database does not exist
        from core.backup import pg_programs

        found = pg_programs("createdb", settings)
        flags = [f"{flag} {shlex.quote(value)}" for flag, value in parts.items() if flag != "db" and value]
        name = parts.get("db", "")
        createdb = " ".join([str(found[0]) if found else "createdb", *flags, shlex.quote(name)])
        quoted = '"' + name.replace('"', '""') + '"'
        return EXIT_FAILED, (
            f'database "{name}" does not exist on {where}: create it with `{createdb}` '
            f"(or CREATE DATABASE {quoted} in psql), or point TALLY_POSTGRES_URL at one that exists"
        )
    if state in ("28000", "28P01"):
        return EXIT_FAILED, f"Postgres at {where} refused the login: {message}: check TALLY_POSTGRES_URL"
    if state == "42P01":  # undefined table
        return EXIT_FAILED, f"{message} in database {parts.get('db', '?')}: run `tally migrate`"
    if state in _PG_TRANSIENT or state.startswith("08"):
        return EXIT_UNAVAILABLE, f"Postgres at {where}: {message}: try again once it answers"
    return EXIT_FAILED, f"Postgres at {where}: {message} (SQLSTATE {state})"


def configuration_error(exc: ValidationError) -> str:
    """pydantic's refusal of the settings on one line: each bad variable, its value and why."""
    reasons = []
    for error in exc.errors(include_url=False):
        why = str(error["msg"]).removeprefix("Value error, ")
        if error["loc"]:
            name = f"TALLY_{str(error['loc'][0]).upper()}"
            reasons.append(f"{name}={error['input']!s}: {why}" if isinstance(error["input"], str) else f"{name}: {why}")
        else:  # a rule across several settings, which names them itself
            reasons.append(why)
    return "; ".join(reasons)


def explain(exc: BaseException, settings: Settings) -> tuple[int, str]:
    """A failed command's exit status and reason, on one line: what is wrong and what to do.

    The cause is looked for under SQLAlchemy's and asyncio's wrappers (core.db.exception_chain):
    Tally's own errors are written for the operator; a driver's is put in words here.
    """
    from aiokafka import errors as kafka_errors
    from sqlalchemy import exc as sa_errors

    kafka_down = f"Kafka at {settings.kafka_bootstrap} did not answer: is it up, and is TALLY_KAFKA_BOOTSTRAP right?"
    chain = exception_chain(exc)
    for cause in chain:
        if isinstance(cause, RollupSpecError | tomllib.TOMLDecodeError):
            return EXIT_FAILED, f"{settings.rollups_file} (TALLY_ROLLUPS_FILE): {_line(cause)}"
        if type(cause).__module__.partition(".")[0] in _OURS:
            return EXIT_UNAVAILABLE if isinstance(cause, OSError) else EXIT_FAILED, _line(cause)
        if isinstance(cause, sa_errors.DBAPIError) and cause.connection_invalidated:
            return EXIT_UNAVAILABLE, (
                f"Postgres at {_postgres(settings)[0]} closed the connection: is it restarting or stopped? "
                "Try again once it answers"
            )
        state = getattr(cause, "sqlstate", None)
        if isinstance(state, str):
            return _postgres_error(state, _line(cause), settings)
        if isinstance(cause, kafka_errors.KafkaConnectionError | kafka_errors.KafkaTimeoutError):
            return EXIT_UNAVAILABLE, kafka_down
        if isinstance(cause, kafka_errors.KafkaError):
            return EXIT_FAILED, f"Kafka at {settings.kafka_bootstrap} refused: {type(cause).__name__}"
        if isinstance(cause, sa_errors.TimeoutError):  # no pooled connection came free
            return EXIT_UNAVAILABLE, f"Postgres at {_postgres(settings)[0]} did not give a connection in time"
        if isinstance(cause, OSError) and cause.filename is not None:
            return EXIT_FAILED, f"{cause.filename}: {cause.strerror or _line(cause)}"
        if isinstance(cause, OSError) and (origin := _origin(cause)) is not None:
            if origin == "kafka":
                return EXIT_UNAVAILABLE, kafka_down
            refused = "connection refused" if isinstance(cause, ConnectionRefusedError) else None
            why = "timed out" if isinstance(cause, TimeoutError) else refused or cause.strerror or _line(cause)
            return EXIT_UNAVAILABLE, (
                f"Postgres at {_postgres(settings)[0]} did not answer ({why}): "
                "is it up, and is TALLY_POSTGRES_URL right?"
            )
    first = next((c for c in chain if not type(c).__module__.startswith("sqlalchemy")), exc)
    return EXIT_FAILED, _line(first) if isinstance(first, ValueError) else f"{type(first).__name__}: {_line(first)}"


def _configure_logs(command: str, settings: Settings) -> None:
    """Services log as configured. Operator tools log warnings, as text, unless TALLY_LOG_LEVEL or
    TALLY_LOG_FORMAT says otherwise; their clients' own complaints are left to the one line of a
    failure (aiokafka logs every refused connection as an error)."""
    service = {"consume": "consumer"}.get(command, command)
    chosen = settings.model_fields_set
    if command in SERVICES:
        logs.configure(service, level=settings.log_level, fmt=settings.log_format)
        return
    level = settings.log_level if "log_level" in chosen else "warning"
    logs.configure(service, level=level, fmt=settings.log_format if "log_format" in chosen else "text")
    if "log_level" not in chosen:
        for name in ("aiokafka", "asyncpg", "sqlalchemy"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(_attach_relative_times(sys.argv[1:] if argv is None else argv))
    # `tally dev` runs without auth (DESIGN §7: optional in the dev stack); everything else has it on.
    overrides: dict[str, object] = {"env": "dev", "auth": False} if args.command == "dev" else {}
    if args.command == "dev":
        # A person reads these in a terminal, and no balancer needs a drain delay.
        overrides |= {
            k: v for k, v in (("log_format", "text"), ("drain_seconds", 0.0)) if f"TALLY_{k.upper()}" not in os.environ
        }
    else:  # beside a running `tally dev`, act on its stack unless told otherwise (core.devenv)
        found, dev_env = devenv.discover(os.environ)
        if dev_env is not None:
            overrides |= found
            print(f"tally: using the `tally dev` stack (pid {dev_env.pid}): {dev_env.summary()}", file=sys.stderr)
    try:
        settings = get_settings(**overrides)
    except ValidationError as exc:
        sys.exit(f"tally: bad configuration: {configuration_error(exc)}")
    _configure_logs(args.command, settings)
    name = " ".join(
        n for n in (args.command, getattr(args, "dlq_command", None), getattr(args, "keys_command", None)) if n
    )
    try:
        code = _dispatch(args, settings)
    except KeyboardInterrupt:
        code = 0 if args.command == "dev" else EXIT_INTERRUPTED  # Ctrl-C is how `tally dev` stops
    except Exception as exc:
        log.debug("tally %s failed", name, exc_info=True)  # TALLY_LOG_LEVEL=debug: the traceback too
        code, reason = explain(exc, settings)
        print(f"tally {name}: {reason}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
