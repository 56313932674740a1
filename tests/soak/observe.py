"""What the soak reads from its processes besides answers: their logs and their metrics.

The processes log JSON lines (TALLY_LOG_FORMAT=json), so a level is a field, not a
guess. Anything at error or critical, and any line that is not JSON (a traceback or
an "Exception ignored" printed straight to stderr), is unexpected: the soak's traffic
holds nothing that should make a process complain that loudly.
"""

from __future__ import annotations

import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import orjson
from prometheus_client.parser import text_string_to_metric_families

LOUD = {"error", "critical"}
KEPT_LINES = 20


@dataclass
class LogReport:
    levels: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)  # the first KEPT_LINES
    unexpected_count: int = 0
    warnings: Counter[str] = field(default_factory=Counter)  # message -> times, for the report


def scan_log(name: str, text: str, into: LogReport) -> None:
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
            level = str(record["level"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            level, record = "not-json", None
        into.levels[level] += 1
        if level == "warning" and record is not None:
            into.warnings[f"{name}: {str(record.get('msg', ''))[:100]}"] += 1
        if level in LOUD or record is None:
            into.unexpected_count += 1
            if len(into.unexpected) < KEPT_LINES:
                into.unexpected.append(f"{name}: {line[:500]}")


def metric_totals(port: int) -> dict[str, float]:
    """Every sample of a process's /metrics summed over its labels, by sample name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return dict(totals)
