"""The `tally` command. Services are named by module path, not imported, so `core`
keeps to the import rule and each service can be installed and run alone."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

from core.settings import Settings, SettingsError, get_settings


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
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=30,
        access_log=False,  # per-request lines cost CPU at ingest rates; metrics count requests
    )


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
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    overrides: dict[str, object] = {"env": "dev"} if args.command == "dev" else {}
    try:
        settings = get_settings(**overrides)
    except Exception as exc:  # pydantic's ValidationError names the bad variable
        sys.exit(f"tally: bad configuration: {exc}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the demo's requests are not news
    try:
        if args.command == "dev":
            from core.devrun import run_dev

            asyncio.run(run_dev(settings, demo=args.demo, demo_rate=args.demo_rate))
        elif args.command == "ingest":
            settings.require("kafka_bootstrap")
            _serve("ingest.app:app_from_env", settings, settings.ingest_port, args.workers)
        elif args.command == "query":
            settings.require("kafka_bootstrap", "postgres_url", "redis_url")
            _serve("query.app:app_from_env", settings, settings.query_port, args.workers)
        elif args.command == "consume":
            consumer = importlib.import_module("consumers.main")
            asyncio.run(consumer.run(settings))
        elif args.command == "migrate":
            from core.migrate import migrate

            asyncio.run(migrate(settings))
    except SettingsError as exc:
        sys.exit(f"tally: {exc}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
