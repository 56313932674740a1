"""Resident memory of the soak's processes, sampled from /proc, and the bound it must stay within.

Why this bound. A Tally process reaches its working set in the first seconds of steady
traffic: pymalloc arenas, connection pools, aiokafka's buffers, SQLAlchemy's compiled
cache and asyncpg's statement cache all fill up to their limits and stay there. After
that, RSS only moves with the garbage collector and the allocator (a few MiB either way
on the soak's processes). So the first WARMUP of the run is ignored; the median of the
samples in the next stretch (up to BASELINE_END) is the baseline and the median of the
last quarter is the end level (medians, so one GC spike decides nothing). The end
level may exceed the baseline by SLACK_BYTES plus SLACK_RATIO of it.

What it catches. The two windows' centres are 0.55 x the run apart: 165 s in a
300 s soak. Ingest answers about 90 requests/s there, so a leak of 1 KiB per request
grows its RSS by ~14.5 MiB between the windows, above the ~11.5 MiB a 70 MiB
process may grow; the query process (about 30 requests/s) fails from ~2.5 KiB per
request. tests/soak/test_memory_bound.py checks the verdict on such series. The 60 s
CI run has the same rule with a third of the time, so it catches only leaks about
five times larger; `make soak` (300 s) is the real check.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024
WARMUP = 0.20  # of the run: ignored (working sets still filling)
BASELINE_END = 0.45  # the baseline is the median of the samples in (WARMUP, BASELINE_END]
FINAL_START = 0.75  # the end level is the median of the samples from here on
SLACK_BYTES = 8 * MIB
SLACK_RATIO = 0.05


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a live process; None once it has gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # kB
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU a live process has used (for the report: who was busy)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the traffic started
    rss: int  # bytes


@dataclass(frozen=True)
class Verdict:
    name: str
    start: int
    peak: int
    end: int
    baseline: int
    final: int
    bound: int
    samples: int
    trace: tuple[int, ...] = ()  # RSS at each tenth of the run, for the report

    @property
    def ok(self) -> bool:
        return self.final <= self.bound

    def row(self) -> str:
        def mib(n: int) -> str:
            return f"{n / MIB:7.1f}"

        verdict = "ok" if self.ok else "GREW"
        trace = " ".join(f"{n / MIB:.0f}" for n in self.trace)
        return (
            f"{self.name:<12} {mib(self.start)} {mib(self.peak)} {mib(self.end)} {mib(self.baseline)} "
            f"{mib(self.final)} {mib(self.bound)} {self.samples:>4}  {verdict:<5} {trace}"
        )


HEADER = (f"{'process':<12} {'start':>7} {'peak':>7} {'end':>7} {'base':>7} {'final':>7} {'bound':>7} {'n':>4}  "
          "(MiB)  at each tenth of the run")


def judge(name: str, samples: list[Sample], seconds: float) -> Verdict:
    """The verdict on one process's series over a run of `seconds`."""
    if not samples:
        raise ValueError(f"{name}: no RSS samples")
    base = [s.rss for s in samples if WARMUP * seconds < s.at <= BASELINE_END * seconds]
    last = [s.rss for s in samples if s.at >= FINAL_START * seconds]
    if len(base) < 3 or len(last) < 3:
        raise ValueError(f"{name}: too few samples to judge ({len(base)} baseline, {len(last)} final)")
    baseline = int(statistics.median(base))
    return Verdict(
        name=name,
        start=samples[0].rss,
        peak=max(s.rss for s in samples),
        end=samples[-1].rss,
        baseline=baseline,
        final=int(statistics.median(last)),
        bound=int(baseline * (1 + SLACK_RATIO) + SLACK_BYTES),
        samples=len(samples),
        trace=tuple(min(samples, key=lambda s: abs(s.at - seconds * i / 10)).rss for i in range(11)),
    )
