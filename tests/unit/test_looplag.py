"""core.looplag: the monitor sees a held loop, and `in_slices` lets the loop in only when work is long."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY

from core.looplag import LoopLagMonitor, in_slices


def lag_histogram(service: str) -> dict[str, float]:
    """`tally_event_loop_lag_seconds` of `service`: bucket upper bound (and "count") -> cumulative count."""
    out: dict[str, float] = {}
    for metric in REGISTRY.collect():
        for s in metric.samples:
            if s.name.startswith("tally_event_loop_lag_seconds") and s.labels.get("service") == service:
                if s.name.endswith("_bucket"):
                    out[s.labels["le"]] = s.value
                elif s.name.endswith("_count"):
                    out["count"] = s.value
    return out


async def test_a_blocked_loop_shows_as_lag() -> None:
    samples: list[float] = []
    monitor = LoopLagMonitor("unit", interval=0.05, observe=samples.append)
    monitor.start()
    try:
        await asyncio.sleep(0.12)
        idle = list(samples)
        time.sleep(0.2)  # holds the loop, as a CPU burst would
        await asyncio.sleep(0.12)
    finally:
        await monitor.stop()
    print(f"\nidle lags {[round(x * 1000, 1) for x in idle]} ms; after the block {monitor.worst * 1000:.0f} ms")
    assert len(idle) >= 1 and max(idle) < 0.1
    assert monitor.worst >= 0.15
    assert max(samples) == monitor.worst and monitor.samples == len(samples)


async def test_the_histogram_counts_the_stall() -> None:
    before = lag_histogram("unit-histogram")
    monitor = LoopLagMonitor("unit-histogram", interval=0.02)
    monitor.start()
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # holds the loop
        await asyncio.sleep(0.05)
    finally:
        await monitor.stop()
    after = lag_histogram("unit-histogram")
    count = after["count"] - before.get("count", 0)
    slow = count - (after["0.1"] - before.get("0.1", 0))  # samples above 100 ms
    assert count == monitor.samples >= 3
    assert slow >= 1


async def test_stop_ends_the_task_and_may_be_repeated() -> None:
    monitor = LoopLagMonitor("unit-stop", interval=0.01, observe=lambda _: None)
    await monitor.stop()  # never started: nothing to do
    monitor.start()
    tasks = {t for t in asyncio.all_tasks() if t.get_name() == "event-loop-lag"}
    assert len(tasks) == 1
    await monitor.stop()
    await monitor.stop()
    assert all(t.done() for t in tasks)


async def test_in_slices_covers_every_item_once_in_order() -> None:
    seen: list[tuple[int, int]] = []
    await in_slices(lambda a, b: seen.append((a, b)), 37, step=16)
    assert seen == [(0, 16), (16, 32), (32, 37)]
    seen.clear()
    await in_slices(lambda a, b: seen.append((a, b)), 0)
    assert seen == []


async def count_turns(work_seconds: float, total: int, budget: float) -> int:
    """How often another task ran while `in_slices` did `total` steps of `work_seconds` each."""
    turns = 0
    done = False

    async def other() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    def work(start: int, stop: int) -> None:
        end = time.perf_counter() + work_seconds
        while time.perf_counter() < end:
            pass

    task = asyncio.create_task(other())
    await asyncio.sleep(0)  # `other` has started and waits for its next turn
    before = turns
    await in_slices(work, total, step=1, budget=budget)
    done = True
    await task
    return turns - before  # its last turn only sees `done`, and counts nothing


async def test_long_work_gives_the_loop_turns_and_short_work_none() -> None:
    assert await count_turns(0.0001, 5, budget=1.0) == 0  # all of it within one slice: no turn
    # 40 steps of 0.5 ms, 1 ms slices: a turn every second step (every step if the machine is slow).
    turns = await count_turns(0.0005, 40, budget=0.001)
    assert 15 <= turns <= 40, turns
