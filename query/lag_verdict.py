"""Lag verdicts per partition and per group, over a sliding window of observations. Pure.

The rules are LinkedIn Burrow's (its `caching` evaluator), adapted to Tally, where
a consumer's stored offset moves only when it applies records (there is no commit
without progress, so Burrow's "committing but not moving" and "not committing"
become "not moving for a while" and "not moving for longer than the window").

An observation is `(time, end_offset, position)`: the log end and the stored offset
the consumer resumes at, sampled every `sample_seconds`; the window holds the last
`samples` of them per partition and spans `samples * sample_seconds` seconds
(`window_seconds`). A verdict also sees the current observation (the sampler's
latest, or the probe an `/v1/ops/lag` request just made) and `applied_at`, when the
stored offset last moved (`tally_offsets.updated_at`). Rules, first match wins:

1. OK      the current lag, or the lag of any observation in the window, is 0.
2. STOP    records wait and nothing has been applied for longer than the window:
           `now - applied_at > window_seconds`.
3. STALL   records wait and the stored offset did not move across the window (at
           least two observations, all at the current position): not yet a STOP.
4. WARN    the stored offset moves but the lag grew in every interval of the window
           (at least two observations): the consumer is falling behind.
5. OK      otherwise (including a single observation with lag: not enough evidence).

UNKNOWN means nothing could be observed (an empty window and no current observation).
A group's verdict is its worst partition's. Burrow's REWIND (the offset moved back)
is not a verdict here: a rewound offset is judged by the rules above like any other.
WARN asks for growth in every interval (Burrow: lag never decreasing), so a
consumer holding a steady non-zero lag under steady load is OK.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from itertools import pairwise


class Status(IntEnum):
    """Verdicts, ordered by severity; the values are the gauge codes."""

    UNKNOWN = -1
    OK = 0
    WARN = 1
    STALL = 2
    STOP = 3


@dataclass(frozen=True, slots=True)
class Observation:
    """One partition at one moment: `time` in seconds (any clock, used consistently)."""

    time: float
    end_offset: int
    position: int  # the stored offset the consumer resumes at (the log start when none is stored)

    @property
    def lag(self) -> int:
        return max(0, self.end_offset - self.position)


@dataclass(frozen=True, slots=True)
class Window:
    """The window's size: how many observations it keeps, and how far apart they are taken."""

    samples: int
    sample_seconds: float

    def __post_init__(self) -> None:
        if self.samples < 2 or self.sample_seconds <= 0:
            raise ValueError("a lag window needs at least 2 samples and a positive sample interval")

    @property
    def seconds(self) -> float:
        return self.samples * self.sample_seconds


def evaluate(
    window: Sequence[Observation],
    current: Observation | None,
    applied_at: float | None,
    window_seconds: float,
) -> Status:
    """The verdict for one partition (rules in the module docstring).

    `window`: sampled observations, oldest first. `current`: the latest observation
    (may be the window's last); its `time` is "now". `applied_at`: when the stored
    offset last moved, or None when that is not known (then STOP cannot be decided).
    """
    latest = current if current is not None else (window[-1] if window else None)
    if latest is None:
        return Status.UNKNOWN
    if latest.lag == 0 or any(o.lag == 0 for o in window):
        return Status.OK
    if applied_at is not None and latest.time - applied_at > window_seconds:
        return Status.STOP
    if len(window) < 2:
        return Status.OK
    if all(o.position == latest.position for o in window):
        return Status.STALL
    if all(b.lag > a.lag for a, b in pairwise(window)):
        return Status.WARN
    return Status.OK


def worst(statuses: Iterable[Status]) -> Status:
    """A group's verdict: its worst known partition; UNKNOWN only if none is known."""
    return max(statuses, default=Status.UNKNOWN)


@dataclass
class _Partition:
    window: deque[Observation]
    since: float  # the first time the current position was seen (a lower bound on idleness)


class Windows:
    """The last `samples` observations per partition, and when each position was first seen.

    `first_seen(p)` stands in for `applied_at` when no offset is stored for a
    partition (no consumer ever applied anything there): it is the earliest time
    this process saw the partition at its current position, so "idle since then"
    is a lower bound, never an overstatement.
    """

    def __init__(self, samples: int) -> None:
        self.samples = samples
        self._parts: dict[int, _Partition] = {}

    def add(self, partition: int, observation: Observation) -> None:
        part = self._parts.get(partition)
        if part is None:
            self._parts[partition] = _Partition(deque([observation], maxlen=self.samples), observation.time)
            return
        if part.window[-1].position != observation.position:
            part.since = observation.time
        part.window.append(observation)

    def window(self, partition: int) -> tuple[Observation, ...]:
        part = self._parts.get(partition)
        return tuple(part.window) if part is not None else ()

    def first_seen(self, partition: int, position: int, now: float) -> float:
        """When this position was first seen (`now` if the partition is new or has moved since)."""
        part = self._parts.get(partition)
        if part is None or part.window[-1].position != position:
            return now
        return part.since

    def partitions(self) -> list[int]:
        return sorted(self._parts)

    def filled(self) -> int:
        """The fewest observations held for any partition (each verdict rests on at least this many)."""
        return min((len(p.window) for p in self._parts.values()), default=0)
