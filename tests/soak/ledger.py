"""What the soak's clients saw: every answer by request kind and status, the answers that
were not the expected ones, latencies, and the running oracle of the events that got a 2xx.

The oracle is merged batch by batch (tests/oracle.py computes each batch's rows) so a
300 s soak does not keep a million event dicts in memory.
"""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from tests import oracle

Rows = dict[tuple[Any, ...], dict[str, Any]]
KEPT_PROBLEMS = 25  # unexpected answers quoted in the report; all are counted


def merge(into: dict[oracle.Key, oracle.Row], rows: dict[oracle.Key, oracle.Row]) -> None:
    """Add one batch's oracle rows: counts and sums add, min and max of min and max."""
    for key, row in rows.items():
        have = into.get(key)
        if have is None:
            into[key] = dict(row)
            continue
        have["count"] += row["count"]
        for measure, pick in (("sum", _add), ("min", min), ("max", max)):
            if row[measure] is not None:
                have[measure] = row[measure] if have[measure] is None else pick(have[measure], row[measure])


def _add(a: Decimal, b: Decimal) -> Decimal:
    return a + b


@dataclass
class Ledger:
    answers: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, status) -> requests
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    problems: list[str] = field(default_factory=list)
    unexpected: int = 0
    accepted: int = 0  # distinct events that got a 2xx: what the rollups must hold
    pending: int = 0  # valid events sent whose answer has not come back yet
    resent: int = 0  # events accepted again (same event_id): de-duplication must drop them
    replays: int = 0  # answers replayed for a repeated Idempotency-Key
    by_type: dict[oracle.Key, oracle.Row] = field(default_factory=dict)
    views: dict[oracle.Key, oracle.Row] = field(default_factory=dict)

    def record(self, kind: str, status: int | str, seconds: float, why: str | None) -> None:
        self.answers[(kind, str(status))] += 1
        self.seconds[kind].append(seconds)
        if why is not None:
            self.unexpected += 1
            if len(self.problems) < KEPT_PROBLEMS:
                self.problems.append(f"{kind} -> {status}: {why}")

    def accept(self, events: list[dict[str, Any]]) -> None:
        self.accepted += len(events)
        merge(self.by_type, oracle.events_by_type(events))
        merge(self.views, oracle.page_views(events))

    def upper_bound(self) -> int:
        """No query may see more events than this: those accepted plus those whose answer is pending."""
        return self.accepted + self.pending

    def expected_events_by_type(self) -> Rows:
        return {
            k: {"count": v["count"], "sum_properties_amount": v["sum"], "min_properties_amount": v["min"],
                "max_properties_amount": v["max"]}
            for k, v in self.by_type.items()
        }

    def expected_page_views(self) -> Rows:
        return {k: {"count": v["count"]} for k, v in self.views.items()}

    def expected_totals_by_type(self) -> dict[str, int]:
        totals: Counter[str] = Counter()
        for (_, type_, _), row in self.by_type.items():
            totals[type_] += row["count"]
        return dict(totals)

    def table(self) -> str:
        lines = [f"{'kind':<16} {'status':<22} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8}"]
        for kind in sorted({k for k, _ in self.answers}):
            times = sorted(self.seconds[kind])
            p50 = statistics.median(times) * 1000
            p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1000
            statuses = ", ".join(f"{s}×{n}" for (k, s), n in sorted(self.answers.items()) if k == kind)
            lines.append(f"{kind:<16} {statuses:<22} {sum(n for (k, _), n in self.answers.items() if k == kind):>8} "
                         f"{p50:>8.1f} {p99:>8.1f}")
        return "\n".join(lines)
