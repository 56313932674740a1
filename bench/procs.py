"""What the benchmarks read about processes from /proc: CPU time, peak RSS, children.

Shared by the benchmarks so that every figure of CPU share and memory is taken the same way.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields from 3 (state) on; the name may hold spaces


def children(pid: int) -> list[int]:
    """Live direct children of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[1] == str(pid):
                found.append(int(entry.name))
    return sorted(found)


def tree(pid: int) -> list[int]:
    """`pid` and all its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU of `pid`; with `children`, also of its live descendants and the reaped ones
    (Postgres backends are children of the postmaster; uvicorn workers of the supervisor)."""
    fields = _stat(pid)
    if fields is None:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
        for child in tree(pid)[1:]:
            child_fields = _stat(child)
            if child_fields is not None:
                ticks += int(child_fields[11]) + int(child_fields[12])
    return ticks / CLK_TCK


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def status_kib(pid: int, field: str) -> int | None:
    """A `kB` line of /proc/<pid>/status (VmHWM: peak resident set; VmRSS: current)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss(pid: int, *, label: str) -> list[dict[str, Any]]:
    """Peak RSS (VmHWM) of `pid` and each live descendant, MiB. Read while they still run:
    a process that exited is gone from /proc. Shared pages (Postgres's shared buffers, a
    forked parent's heap) count in every process that touched them."""
    rows = []
    for p in tree(pid):
        hwm = status_kib(p, "VmHWM")
        if hwm is None:
            continue
        rows.append({"process": label, "pid": p, "parent": p != pid, "peak_rss_mib": round(hwm / 1024, 1),
                     "cmd": cmdline(p)[:120]})
    return rows


@dataclass
class CpuMeter:
    """CPU used by a set of processes (each with its descendants) between `start` and `stop`,
    as a percentage of one core."""

    pids: dict[str, int]
    descendants: bool = True  # count each process's descendants with it
    _before: dict[str, float] | None = None
    _t0: float = 0.0

    def sample(self) -> dict[str, float]:
        return {name: cpu_seconds(pid, children=self.descendants) for name, pid in self.pids.items()}

    def start(self) -> None:
        self._before, self._t0 = self.sample(), time.perf_counter()

    def stop(self) -> dict[str, float]:
        assert self._before is not None
        after, elapsed = self.sample(), time.perf_counter() - self._t0
        return {name: round((after[name] - self._before[name]) / elapsed * 100) for name in after}


def machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) clock ticks of all CPUs since boot, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + idle + iowait + steal


def own_cpu_seconds() -> float:
    """CPU of this process and all its descendants: those alive (with the children they reaped)
    and those it reaped (with theirs)."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for pid in tree(os.getpid())[1:]:
        fields = _stat(pid)
        if fields is not None:
            total += sum(int(x) for x in fields[11:15]) / CLK_TCK
    return total


@dataclass
class Foreign:
    """CPU the machine spent on processes that are not this one or its descendants (another
    user's tests, say), and CPU stolen by the hypervisor, over a span; in % of one core."""

    _start: tuple[tuple[int, int, int], float, float] | None = None

    def start(self) -> None:
        self._start = (machine_ticks(), own_cpu_seconds(), time.perf_counter())

    def stop(self) -> dict[str, float]:
        assert self._start is not None
        (busy0, steal0, _), own0, t0 = self._start
        busy1, steal1, _ = machine_ticks()
        elapsed = time.perf_counter() - t0
        foreign = (busy1 - busy0) / CLK_TCK - (own_cpu_seconds() - own0)
        return {"foreign_cpu_percent": round(max(0.0, foreign) / elapsed * 100),
                "steal_percent": round((steal1 - steal0) / CLK_TCK / elapsed * 100)}
