"""The lag sampler: an observation every `lag_sample_seconds`, verdicts, and their gauges.

Runs in the query app's lifespan. Each tick asks the `LagProbe` (the same probe
`/v1/ops/lag` uses) for every partition's end and stored offset, keeps the last
`lag_window_samples` observations per partition (`query.lag_verdict.Windows`),
and exports the verdicts as `tally_consumer_status` and `tally_consumer_group_status`.

A tick that fails (Kafka or Postgres down, the topic missing) adds no observation
and never stops the app: the gauges read -1 (UNKNOWN) until a tick succeeds, and
the observations already held are kept, so the window continues across the gap.
Each query worker process samples on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from core import metrics
from core.settings import Settings
from query.lag import LagProbe
from query.lag_verdict import Observation, Status, Window, Windows, evaluate, worst
from schemas.api import LagReport, LagWindow, PartitionLag

log = logging.getLogger(__name__)


def observation(p: PartitionLag, now: float) -> Observation:
    # end - lag is the offset the consumer resumes at (the log start when none is stored).
    return Observation(time=now, end_offset=p.end_offset, position=p.end_offset - p.lag_records)


class LagSampler:
    def __init__(self, probe: LagProbe, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.probe = probe
        self.group = settings.consumer_group
        self.topic = settings.topic
        self.window = Window(settings.lag_window_samples, settings.lag_sample_seconds)
        self.windows = Windows(self.window.samples)
        self._clock = clock
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    # Verdicts.

    def judge(self, report: LagReport, now: float | None = None) -> LagReport:
        """`report` with a verdict per partition and for the group, over the window plus `report` itself.

        `report` is the current observation; it is not added to the window (only ticks
        are, so that requests cannot shrink the window's span).
        """
        now = self._clock() if now is None else now
        partitions = []
        for p in report.partitions:
            current = observation(p, now)
            if p.idle_seconds is not None:
                applied_at = now - p.idle_seconds
            else:  # nothing stored: idle at least since this position was first seen here
                applied_at = self.windows.first_seen(p.partition, current.position, now)
            status = evaluate(self.windows.window(p.partition), current, applied_at, self.window.seconds)
            partitions.append(p.model_copy(update={"status": status.name}))
        group = worst(Status[p.status] for p in partitions)
        window = LagWindow(
            samples=self.window.samples,
            sample_seconds=self.window.sample_seconds,
            seconds=self.window.seconds,
            observations=self.windows.filled(),
        )
        return report.model_copy(update={"partitions": partitions, "status": group.name, "window": window})

    # Ticks.

    async def sample(self) -> LagReport | None:
        """One observation of every partition; None (and UNKNOWN gauges) if it failed."""
        try:
            report = await self.probe.report()
        except Exception as exc:  # whatever went wrong, the app keeps serving queries
            metrics.lag_sample_failures.inc()
            if not self._failing:
                log.warning(
                    "lag sampling failed (%s: %s); verdicts are UNKNOWN until it works", type(exc).__name__, exc
                )
            self._failing = True
            self._export_unknown()
            return None
        if self._failing:
            log.info("lag sampling works again")
        self._failing = False
        now = self._clock()
        for p in report.partitions:
            self.windows.add(p.partition, observation(p, now))
        judged = self.judge(report, now)
        self._export(judged)
        return judged

    def _export(self, report: LagReport) -> None:
        for p in report.partitions:
            metrics.consumer_status.labels(self.group, self.topic, str(p.partition)).set(Status[p.status])
        metrics.consumer_group_status.labels(self.group, self.topic).set(Status[report.status])

    def _export_unknown(self) -> None:
        for partition in self.windows.partitions():
            metrics.consumer_status.labels(self.group, self.topic, str(partition)).set(Status.UNKNOWN)
        metrics.consumer_group_status.labels(self.group, self.topic).set(Status.UNKNOWN)

    async def _run(self) -> None:
        """Ticks at a fixed rate; a tick that overran its interval skips ahead instead of bunching up."""
        loop = asyncio.get_running_loop()
        interval = self.window.sample_seconds
        due = loop.time() + interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(0.0, due - loop.time()))
            if self._stop.is_set():
                return
            due = max(due + interval, loop.time() + interval / 2)
            await self.sample()

    def start(self) -> None:
        """Sample in the background; the first observation is taken one interval after start."""
        self._export_unknown()
        self._task = asyncio.create_task(self._run(), name="tally-lag-sampler")

    async def stop(self, grace: float = 10.0) -> None:
        """Let a probe in flight finish (it has its own deadline), then end the task."""
        self._stop.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
