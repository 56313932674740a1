"""The event loop's promptness: measured by `LoopLagMonitor`, kept by `in_slices`.

Every service runs one event loop per process; whatever holds it (a CPU burst, a blocking call)
delays every other request on that worker, /healthz included. `LoopLagMonitor` is a task that
sleeps a fixed interval and records how much later than due it woke, into
`tally_event_loop_lag_seconds`. A healthy loop wakes within a millisecond or two; a loop held by
a 50 ms burst shows that burst as a 50 ms sample.

`in_slices` is the other half: it runs a CPU-bound loop (validating a batch of 10,000 events)
in small steps and, whenever a slice of SLICE_SECONDS is used up, gives the loop a turn
(`await asyncio.sleep(0)`). A thread would not help: the work is Python code, so it would hold
the GIL for up to the switch interval (5 ms) at a time, and add a hand-off to every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable

from core import metrics

INTERVAL_SECONDS = 0.05  # how often the monitor wakes: 20 samples a second per process
SLICE_SECONDS = 0.0005  # how long a CPU-bound loop may hold the event loop before it yields


class LoopLagMonitor:
    """A task that sleeps `interval` seconds at a time and observes how late it woke.

    Start it in a lifespan (`start()`), stop it in its `finally` (`await stop()`). `observe` gets
    each lag in seconds; by default `tally_event_loop_lag_seconds{service=...}`. `last` and
    `worst` keep the last and the largest lag seen, for tests and logs.
    """

    def __init__(
        self,
        service: str,
        *,
        interval: float = INTERVAL_SECONDS,
        observe: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.interval = interval
        self._observe = observe if observe is not None else metrics.event_loop_lag.labels(service).observe
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.samples = 0
        self.last = 0.0
        self.worst = 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="event-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        clock, interval = self._clock, self.interval
        while True:
            slept_at = clock()
            await asyncio.sleep(interval)
            self.record(max(0.0, clock() - slept_at - interval))

    def record(self, lag: float) -> None:
        self.samples += 1
        self.last = lag
        self.worst = max(self.worst, lag)
        self._observe(lag)


STEP_ITEMS = 16  # items of work between looks at the clock (16 ordinary events: about 0.1 ms)


async def in_slices(
    work: Callable[[int, int], None], total: int, *, step: int = STEP_ITEMS, budget: float = SLICE_SECONDS
) -> None:
    """`work(start, stop)` over `0..total`, `step` items at a time, giving the loop a turn
    (`asyncio.sleep(0)`) whenever `budget` seconds of it have been used since the last turn.
    Work that takes less than `budget` never yields; its only cost is a clock read per step."""
    clock = time.perf_counter
    ends = clock() + budget
    for start in range(0, total, step):
        work(start, min(start + step, total))
        if clock() >= ends:
            await asyncio.sleep(0)
            ends = clock() + budget


FULL_COLLECTION_EVERY = 100  # middle-generation collections between full ones (CPython's default: 10)


def settle_heap() -> None:
    """Once per process, when a service has started: keep the cyclic collector's full passes short and rare.

    Its modules, app, routes and schemas (~140k objects in ingest) live as long as the process,
    yet every full collection walked them all: under batches of 10,000 events full collections
    came twice a second and held the loop up to 108 ms. `gc.freeze()` puts what is alive now out
    of the collector's reach (garbage is collected first, so none of it is frozen); a full
    collection then walks only what requests made, ~10 ms under such batches, and a tenth as many
    of them run. Young collections, which find almost all cyclic garbage, are left as they are.
    """
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
