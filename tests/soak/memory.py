"""Resident memory of the soak's processes, sampled from /proc, and the bound it must stay within.

Why this bound. A Tally process reaches its working set in the first seconds of steady
traffic: pymalloc arenas, connection pools, aiokafka's buffers, SQLAlchemy's compiled
cache and asyncpg's statement cache all fill up to their limits and stay there. RSS keeps
a high-water mark, though (arenas are returned only when wholly empty): ingest's follows
the most requests it ever held at once, so the soak starts with bursts at its client's
full concurrency (traffic.Ingest.burst) to set that mark during the warm-up; without them,
a load spike from elsewhere on a shared machine once raised ingest 13 MiB late in a clean
run. After that, RSS only moves with the garbage collector and the allocator. So the
first WARMUP of the run is ignored; the median of the samples in the next stretch (up to
BASELINE_END) is the baseline and the median of the last quarter is the end level
(medians, so one GC spike decides nothing). The end level may exceed the baseline by
SLACK_BYTES plus SLACK_RATIO of it: about 10 MiB for the soak's processes (90-115 MiB).

Measured (2-core machine shared with other test runs, load average 4-9): in clean soaks
(five of 60 s, three of 300 s) the largest end-over-baseline growth of any process was
3.8 MiB (ingest, 60 s, before the bursts); with the bursts, ingest moved 0.0 MiB over
300 s, the consumers and query under 1 MiB.

What it catches, measured with a leak injected into `tally ingest` (a sitecustomize
wrapping Starlette's __call__ to keep N bytes per HTTP request; ~90 requests/s, so ~15,000
between the windows' centres, 0.55 x the run apart): over 300 s, 2 KiB per request grew
ingest 44.7 MiB against 10.6 allowed (fails, 4x margin); 1 KiB per request grew it only
7.4 MiB and passed, because its first ~15 MiB filled heap that the warm-up bursts had
freed (without the bursts the same leak grew it 13.9 MiB). So `make soak` fails leaks from
about 1.5 KiB per ingest request (~4 KiB per query request, 30/s); the 60 s CI run, with a
fifth of the requests, only from about 6 KiB. tests/soak/test_memory_bound.py checks the
verdict on such series.
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
SLACK_BYTES = 6 * MIB
SLACK_RATIO = 0.04


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
