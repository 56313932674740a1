"""`tally consume`: run one aggregation worker until stopped.

Start-up waits for Kafka and Postgres (and for `tally migrate`) with backoff
instead of crashing, so a whole stack can start in any order. SIGTERM/SIGINT (or
`stop`) finishes and commits the batch in flight, then leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Iterator, Sequence

from aiokafka.errors import KafkaError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from consumers.aggregate import RollupPlan, compile_rollups
from consumers.dlq import DeadLetterSink
from consumers.ops import Health, OpsServer, build_app
from consumers.registry import NotRegistered, StaleRollups, registry_version
from consumers.retry import FIRST_DELAY, MAX_DELAY, Stopped, kafka_transient, postgres_transient, retrying, wait_or_stop
from consumers.runner import Listener, Runner
from consumers.versions import VersionBumper
from core import kafka, logs, retention
from core.cache import redis_client
from core.db import write_engine
from core.looplag import LoopLagMonitor
from core.settings import Settings, get_settings

log = logging.getLogger(__name__)
START_TIMEOUT = 30.0


class NotMigrated(Exception):
    """A table the consumer writes does not exist yet: `tally migrate` has not run."""


async def wait_for_tables(engine: AsyncEngine, plans: Sequence[RollupPlan], stop: asyncio.Event) -> int:
    """Wait until Postgres answers, has every table and registers exactly these rollups;
    return the registry version. A registry listing other rollups raises StaleRollups."""
    names = ["tally_offsets", "tally_meta", "tally_rollups", "tally_rollup_starts", *(p.spec.table for p in plans)]

    async def check() -> int:
        async with engine.connect() as conn:
            found = (
                (
                    await conn.execute(
                        text("SELECT to_regclass(t) FROM unnest(CAST(:names AS text[])) AS t"), {"names": names}
                    )
                )
                .scalars()
                .all()
            )
        missing = [n for n, f in zip(names, found, strict=True) if f is None]
        if missing:
            raise NotMigrated(f"missing tables {', '.join(missing)}: run `tally migrate`")
        try:
            return await registry_version(engine, [p.spec for p in plans])
        except NotRegistered as exc:
            raise NotMigrated(str(exc)) from None

    return await retrying(
        check,
        what="wait for Postgres",
        transient=lambda e: isinstance(e, NotMigrated) or postgres_transient(e),
        stop=stop,
    )


async def start_consumer(
    settings: Settings,
    engine: AsyncEngine,
    dlq: DeadLetterSink,
    plans: Sequence[RollupPlan],
    stop: asyncio.Event,
    versions: VersionBumper | None = None,
) -> Runner:
    """Join the group (retrying until Kafka answers), with offsets taken from Postgres on assignment."""

    async def attempt() -> Runner:
        consumer = kafka.consumer(settings, group_id=settings.consumer_group)
        runner = Runner(settings, consumer, engine, dlq, plans, stop, versions)
        consumer.subscribe([settings.topic], listener=Listener(runner))
        try:
            await asyncio.wait_for(consumer.start(), START_TIMEOUT)
        except BaseException:
            with contextlib.suppress(Exception):
                await consumer.stop()
            raise
        return runner

    return await retrying(attempt, what="start Kafka consumer", transient=kafka_transient, stop=stop)


async def consume(runner: Runner, stop: asyncio.Event) -> None:
    """Poll and apply until stopped. A Kafka error while polling is waited out, then positions resync."""
    delay = FIRST_DELAY
    while not stop.is_set():
        try:
            await runner.step()
            delay = FIRST_DELAY
        except KafkaError as exc:
            log.warning("poll failed (%s: %s); retrying in %.1f s", type(exc).__name__, exc, delay)
            await wait_or_stop(stop, delay)
            delay = min(delay * 2, MAX_DELAY)
            await runner.resync_all()  # whatever was fetched and not applied is fetched again


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def run(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run one consumer of `settings.topic` for `settings.consumer_group` until `stop` (or a signal)."""
    settings.require("kafka_bootstrap", "postgres_url")
    plans = compile_rollups(settings.rollups)
    own_signals = stop is None
    stop = stop if stop is not None else asyncio.Event()
    engine = write_engine(str(settings.postgres_url), pool_size=2, app="tally-consumer")
    health = Health(engine)
    app = build_app(health)
    ops = OpsServer(app, settings.bind_host, settings.consumer_metrics_port)
    dlq = DeadLetterSink(settings)
    runner: Runner | None = None
    # With Redis configured, commits move the query cache's rollup versions (fresh dashboards).
    versions = (
        VersionBumper(redis_client(str(settings.redis_url), max_connections=2), settings.cache_prefix)
        if settings.redis_url
        else None
    )
    expiry: asyncio.Task[None] | None = None  # deletes buckets past their retention, now and then
    loop_lag = LoopLagMonitor("consumer")
    with _stop_on_signals(stop) if own_signals else contextlib.nullcontext():
        await ops.start()
        loop_lag.start()
        try:
            version = await wait_for_tables(engine, plans, stop)
            expiry = retention.start_periodic(settings, stop)
            await dlq.start(stop=stop)
            runner = await start_consumer(settings, engine, dlq, plans, stop, versions)
            runner.flusher.version = version
            health.consumer = runner.consumer
            # What is alive now (modules, clients, pools) lives as long as the process: out of the
            # collector's way, so the collections the batches trigger do not walk it each time.
            gc.freeze()
            log.info(
                "consuming %s as group %s; metrics on %s:%d",
                settings.topic,
                settings.consumer_group,
                settings.bind_host,
                settings.consumer_metrics_port,
            )
            await consume(runner, stop)
            await runner.drain()
        except Stopped as exc:
            log.warning("stopped before the work in hand was done (nothing of it committed): %s", exc)
        finally:
            app.state.draining = True
            await loop_lag.stop()
            await retention.stop_periodic(expiry, stop)
            if runner is not None:
                await runner.close()
                await runner.consumer.stop()
            if versions is not None:
                await versions.close()
            await dlq.stop()
            await ops.stop()
            await engine.dispose()
    log.info("consumer stopped")


def serve(settings: Settings) -> int:
    """Run until stopped; the exit status. 3: this rollups file is stale, redeploy rather than restart."""
    try:
        asyncio.run(run(settings))
    except StaleRollups as exc:
        log.error("%s", exc)
        return 3
    return 0


def main() -> None:
    settings = get_settings()
    logs.configure("consumer", level=settings.log_level, fmt=settings.log_format)
    raise SystemExit(serve(settings))
