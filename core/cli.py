"""The `tally` command. Services are named by module path, not imported, so `core`
keeps to the import rule and each service can be installed and run alone."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from core import devenv, logs
from core.settings import Settings, SettingsError, get_settings

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


def _serve(app_path: str, settings: Settings, port: int, workers: int) -> None:
    import uvicorn

    _prepare_multiprocess_metrics(workers)
    uvicorn.run(
        app_path,
        factory=True,
        host=settings.bind_host,
        port=port,
        workers=workers,
        log_level=settings.log_level,
        log_config=None,  # the app factory configures logging (core.logs) in each worker
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_seconds)),
        access_log=False,  # per-request lines cost CPU at ingest rates; metrics count requests
        server_header=False,  # "Server: uvicorn" tells an attacker what to look up, and a client nothing
    )


_RELATIVE_TIME = re.compile(r"^-\d+[smhdw]$")


def _attach_relative_times(argv: Sequence[str]) -> list[str]:
    """`--since -1h` as `--since=-1h`: argparse would take `-1h` for an option and refuse it."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in ("--since", "--from") and _RELATIVE_TIME.match(arg):
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
    sub.add_parser("consume", help="run one consumer against configured servers")
    sub.add_parser("migrate", help="create topics, the offsets table and every rollup table")
    backfill = sub.add_parser("backfill", help="fill a new rollup's past from the topic, exactly once")
    backfill.add_argument("rollup", help="the rollup's name in the rollups file")
    backfill.add_argument(
        "--from", dest="since", default=None, help="earliest (default), ISO 8601 with an offset, or relative like -7d"
    )
    backfill.add_argument(
        "--wait",
        type=float,
        default=60.0,
        help="seconds to wait for the consumers to apply the rollup once on every partition",
    )
    dlq = sub.add_parser("dlq", help="inspect the dead-letter topic, or replay dead letters after a fix")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    since_help = "only dead letters written at or after WHEN: ISO 8601 with an offset, or relative like -1h"
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
    manifest = await backup.restore(settings, args.directory, jobs=args.jobs)
    print(f"restored, row counts checked: {backup.describe(manifest)}")
    try:
        gaps = await backup.replay_gaps(settings, manifest)
    except Exception as exc:  # Kafka unreachable: say so, the restore itself is done
        print(f"warning: could not check that Kafka still holds the records after the offsets: {exc}")
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
    except Exception as exc:  # pydantic's ValidationError names the bad variable
        sys.exit(f"tally: bad configuration: {exc}")
    logs.configure(
        {"consume": "consumer"}.get(args.command, args.command), level=settings.log_level, fmt=settings.log_format
    )
    try:
        if args.command == "dev":
            from core.devrun import run_dev

            asyncio.run(run_dev(settings, demo=args.demo, demo_rate=args.demo_rate))
        elif args.command == "ingest":
            auth = ("postgres_url",) if settings.auth else ()  # API keys live in Postgres
            settings.require("kafka_bootstrap", "redis_url", *auth)
            _serve("ingest.app:app_from_env", settings, settings.ingest_port, args.workers)
        elif args.command == "query":
            settings.require("kafka_bootstrap", "postgres_url", "redis_url")
            _serve("query.app:app_from_env", settings, settings.query_port, args.workers)
        elif args.command == "consume":
            consumer = importlib.import_module("consumers.main")
            sys.exit(consumer.serve(settings))
        elif args.command == "migrate":
            from core.migrate import migrate

            asyncio.run(migrate(settings))
        elif args.command == "backfill":
            tool = importlib.import_module("consumers.backfill")
            sys.exit(asyncio.run(tool.run(settings, args.rollup, args.since, args.wait)))
        elif args.command == "dlq":
            tools = importlib.import_module("consumers.dlq_tools")
            if args.dlq_command == "inspect":
                code = asyncio.run(tools.inspect(settings, limit=args.limit, since=args.since, json_lines=args.json))
            else:
                code = asyncio.run(
                    tools.replay_command(
                        settings, since=args.since, dry_run=args.dry_run, include_replayed=args.include_replayed
                    )
                )
            sys.exit(code)
        elif args.command == "retention":
            from sqlalchemy.exc import SQLAlchemyError

            from core.retention import RetentionError

            try:
                asyncio.run(_retention(settings, args.dry_run))
            except (RetentionError, SQLAlchemyError, OSError) as exc:  # e.g. Postgres unreachable, a lock timeout
                sys.exit(f"tally: retention failed: {exc}")
        elif args.command in ("backup", "restore"):
            from sqlalchemy.exc import SQLAlchemyError

            from core.backup import BackupError

            try:
                asyncio.run(_backup(settings, args))
            except (BackupError, SQLAlchemyError, OSError) as exc:
                sys.exit(f"tally: {args.command} failed: {exc}")
        elif args.command == "keys":
            try:
                asyncio.run(_keys(settings, args))
            except (ValueError, OSError) as exc:  # bad name or rate limit; Postgres unreachable
                sys.exit(f"tally: {exc}")
    except SettingsError as exc:
        sys.exit(f"tally: {exc}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
