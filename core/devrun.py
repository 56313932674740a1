"""`tally dev`: the whole pipeline on one machine with one command.

Starts an embedded server for each of Kafka, Postgres and Redis that has no URL
configured, migrates, then runs ingest, query and one consumer as child
processes and stops everything on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys

from sqlalchemy import text

from core import devstack
from core.db import write_engine
from core.migrate import migrate
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


async def run_dev(settings: Settings, *, demo: bool, demo_rate: int) -> None:
    settings, servers = start_embedded(settings)
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        await migrate(settings)
        if any(s.name == "kafka" for s in servers):
            await forget_offsets(settings)
        for name in ("ingest", "query", "consume"):
            children[name] = spawn(name, settings)
        for port in (settings.ingest_port, settings.query_port, settings.consumer_metrics_port):
            await asyncio.to_thread(devstack.wait_for_port, port, 60.0)
        _banner(settings)
        await _supervise(settings, children, demo=demo, demo_rate=demo_rate)
    finally:
        for proc in children.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in children.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for server in reversed(servers):
            server.stop()
        log.info("stopped")


async def _supervise(
    settings: Settings, children: dict[str, subprocess.Popen[bytes]], *, demo: bool, demo_rate: int
) -> None:
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
            for name, proc in children.items():
                if proc.poll() is not None:
                    log.error("%s exited with %s; stopping the stack", name, proc.returncode)
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
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


def _banner(settings: Settings) -> None:
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

  curl -s -XPOST {ingest}/v1/events -H 'content-type: application/json' \\
       -d '{{"events":[{{"type":"purchase","source":"web","properties":{{"amount":9.99}}}}]}}'
  curl -s '{query}/v1/rollups/events_by_type?from=-1h&granularity=hour&fields=type,count,sum_properties_amount'
""",
        flush=True,
    )
