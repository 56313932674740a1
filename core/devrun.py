"""`tally dev`: the whole pipeline on one machine with one command.

Starts an embedded server for each of Kafka, Postgres and Redis that has no URL
configured, migrates, then runs ingest, query and one consumer as child
processes. A child that exits is started again with backoff (a crash, a kill -9,
the consumer fenced by a `tally migrate`), so the stack outlives what a person
tries on it; Ctrl-C or SIGTERM stops everything. While it runs, `.tally/env`
tells the other `tally` commands where its servers are (core.devenv).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import text

from core import devenv, devstack
from core.db import write_engine
from core.migrate import migrate
from core.restart import Child, RestartPolicy, how_it_ended
from core.settings import Settings

log = logging.getLogger("tally.dev")


def start_embedded(settings: Settings) -> tuple[Settings, list[devstack.EmbeddedServer]]:
    """Start what is not configured; return settings pointing at everything."""
    servers: list[devstack.EmbeddedServer] = []
    update: dict[str, str] = {}
    try:
        if settings.kafka_bootstrap is None:
            servers.append(devstack.kafka(settings.dev_kafka_port).start())
            update["kafka_bootstrap"] = servers[-1].url
        if settings.postgres_url is None:
            data = settings.dev_dir.resolve() / "postgres" / "data"
            data.parent.mkdir(parents=True, exist_ok=True)
            servers.append(devstack.postgres(data, settings.dev_postgres_port).start())
            update["postgres_url"] = servers[-1].url
        if settings.redis_url is None:
            servers.append(devstack.redis(settings.dev_redis_port).start())
            update["redis_url"] = servers[-1].url
    except Exception:
        for server in reversed(servers):
            server.stop()
        raise
    for server in servers:
        log.info("embedded %s on %s", server.name, server.url)
    if not settings.metrics_targets:  # the console's rates: this stack's ingest and consumer
        ingest = _url(settings, settings.ingest_port)
        consumer = _url(settings, settings.consumer_metrics_port)
        update["metrics_targets"] = f"ingest={ingest}/metrics,consumer={consumer}/metrics"
    return settings.model_copy(update=update), servers


async def forget_offsets(settings: Settings) -> None:
    """A fresh embedded broker starts an empty log, so offsets stored for the old one
    would skip new records. The rollups keep their history; only positions reset."""
    engine = write_engine(str(settings.postgres_url), pool_size=1, app="tally-dev")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM tally_offsets WHERE topic = :t"), {"t": settings.topic})
    finally:
        await engine.dispose()


def spawn(command: str, settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "core.cli", command], env=settings.process_env(), preexec_fn=devstack._die_with_parent
    )


RESTART = RestartPolicy()  # how `tally dev` restarts a child that exited
STALE_ROLLUPS = 3  # `tally consume`'s exit status when `tally migrate` registered other rollups
# Which children read the rollups file at start: after a `tally migrate`, they must start again.
READS_ROLLUPS = ("query", "consume")


def exit_reason(name: str, code: int) -> str:
    """Why a child stopped, in words, and what the supervisor does about it."""
    if name == "consume" and code == STALE_ROLLUPS:
        return (
            f"{name} exited with {code}: its rollups file differs from the one `tally migrate` registered; "
            f"restarting {' and '.join(READS_ROLLUPS)} with the current file (run `tally migrate` if you changed it)"
        )
    return f"{name} {how_it_ended(code)}; restarting it"


async def run_dev(settings: Settings, *, demo: bool, demo_rate: int) -> None:
    settings, servers = start_embedded(settings)
    children: dict[str, Child] = {}
    dev_dir = settings.dev_dir.resolve()
    try:
        await migrate(settings)
        if any(s.name == "kafka" for s in servers):
            await forget_offsets(settings)
        for name in ("ingest", "query", "consume"):
            children[name] = Child(name, spawn(name, settings), time.monotonic())
        for port in (settings.ingest_port, settings.query_port, settings.consumer_metrics_port):
            await asyncio.to_thread(devstack.wait_for_port, port, 60.0)
        env = devenv.DevEnv(os.getpid(), _shared(settings))
        devenv.write(dev_dir, env)
        _banner(settings, env)
        await _supervise(settings, children, demo=demo, demo_rate=demo_rate)
    finally:
        devenv.remove(dev_dir, os.getpid())
        for child in children.values():
            if child.process.poll() is None:
                child.process.terminate()
        for child in children.values():
            try:
                child.process.wait(15)
            except subprocess.TimeoutExpired:
                child.process.kill()
        for server in reversed(servers):
            server.stop()
        log.info("stopped")


def _shared(settings: Settings) -> dict[str, str]:
    values = {name: getattr(settings, name) for name in devenv.SHARED}
    values["rollups_file"] = Path(values["rollups_file"]).resolve()
    return {name: str(value) for name, value in values.items() if value is not None}


def _restart_due(children: dict[str, Child], policy: RestartPolicy, now: float) -> None:
    """Note every child that exited, and when it starts again; say why, once."""
    for child in children.values():
        code = child.process.poll()
        if code is None or child.restart_at is not None:
            continue
        if child.stopped_for is not None:  # not a failure: start it again at once
            log.warning("%s stopped %s (pid %d)", child.name, child.stopped_for, child.process.pid)
            child.restart_at, child.stopped_for = now, None
            continue
        child.schedule_restart(policy, now)
        log.warning("%s (pid %d)", exit_reason(child.name, code), child.process.pid)
        if child.name == "consume" and code == STALE_ROLLUPS:
            for name in READS_ROLLUPS:  # the query service must serve the new rollups too
                other = children.get(name)
                if other is not None and other is not child and other.process.poll() is None:
                    other.stopped_for = "to load the new rollups"
                    other.process.terminate()


async def _supervise(
    settings: Settings,
    children: dict[str, Child],
    *,
    demo: bool,
    demo_rate: int,
    policy: RestartPolicy = RESTART,
) -> None:
    """Keep every child running until Ctrl-C or SIGTERM: one that exits (a crash, a kill -9, the
    consumer's exit 3 after `tally migrate`) is started again with backoff, the rest keep serving."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    demo_task = None
    if demo:
        from core.demo import run_demo

        demo_task = asyncio.create_task(run_demo(_url(settings, settings.ingest_port), events_per_second=demo_rate))
    try:
        while not stop.is_set():
            now = time.monotonic()
            _restart_due(children, policy, now)
            for child in children.values():
                if child.restart_at is not None and child.process.poll() is not None and now >= child.restart_at:
                    child.process = spawn(child.name, settings)
                    child.started, child.restart_at = now, None
                    log.warning("%s started again (pid %d)", child.name, child.process.pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
    finally:
        if demo_task:
            demo_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await demo_task


def _url(settings: Settings, port: int) -> str:
    return f"http://{settings.bind_host}:{port}"


def _auth_line(settings: Settings) -> str:
    if settings.auth:
        return "on: send `Authorization: Bearer <key>` (create one with `tally keys create`)"
    return "off in `tally dev`; `tally ingest` and `tally query` require API keys (`tally keys create`)"


def _banner(settings: Settings, env: devenv.DevEnv) -> None:
    ingest, query = _url(settings, settings.ingest_port), _url(settings, settings.query_port)
    print(
        f"""
Tally is running (Ctrl-C stops everything)
  ingest   {ingest}/v1/events       docs {ingest}/docs
  query    {query}/v1/rollups       docs {query}/docs
  console  {query}/console/
  lag      {query}/v1/ops/lag
  metrics  {ingest}/metrics  {query}/metrics  http://{settings.bind_host}:{settings.consumer_metrics_port}/metrics
  auth     {_auth_line(settings)}
  servers  {env.export_line()}
           (`tally keys`, `tally dlq`, `tally backfill`... in this directory find them in
           {devenv.path(settings.dev_dir)} by themselves; other tools: `source {devenv.path(settings.dev_dir)}`)

  curl -s -XPOST {ingest}/v1/events -H 'content-type: application/json' \\
       -d '{{"events":[{{"type":"purchase","source":"web","properties":{{"amount":9.99}}}}]}}'
  curl -s '{query}/v1/rollups/events_by_type?from=-1h&granularity=hour&fields=type,count,sum_properties_amount'
""",
        flush=True,
    )
