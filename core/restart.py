"""Restarting a child process that exited, with backoff: one policy for every Tally supervisor.

`tally dev` (core.devrun) restarts its services and `tally consume --processes N`
(consumers.supervise) its consumers the same way, so a crash-looping child is retried
at the same pace wherever it runs. It lives apart from core.devrun because a consumer
supervisor in production has no business importing the dev stack (embedded servers,
migrations) to get a backoff; it imports nothing but the standard library.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How a supervisor restarts a child that exited: after `first` seconds, doubling to `longest`;
    a child that ran `healthy` seconds starts again from `first`."""

    first: float = 0.5
    longest: float = 30.0
    healthy: float = 30.0

    def delay(self, failures: int) -> float:
        return float(min(self.longest, self.first * 2 ** max(0, failures - 1)))


def how_it_ended(code: int) -> str:
    """A `Popen.returncode` in words: "exited with 1", "was killed by signal 9"."""
    return f"was killed by signal {-code}" if code < 0 else f"exited with {code}"


@dataclass
class Child:
    """One supervised child process and its restart state."""

    name: str
    process: subprocess.Popen[bytes]
    started: float
    failures: int = 0
    restart_at: float | None = None  # set while it waits to be started again
    stopped_for: str | None = None  # set when the supervisor itself stopped it, and why

    def schedule_restart(self, policy: RestartPolicy, now: float) -> float:
        """Count the exit as a failure and set when the child starts again; the delay.
        A child that had run `policy.healthy` seconds counts from one again: a crash a day
        is not a crash loop."""
        self.failures = 1 if now - self.started >= policy.healthy else self.failures + 1
        delay = policy.delay(self.failures)
        self.restart_at = now + delay
        return delay
