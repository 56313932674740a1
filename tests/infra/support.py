"""What the infra tests share: the files under infra/, promtool, metric names in PromQL and in
a /metrics scrape, and a running set of Tally processes with some activity behind them."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiokafka import AIOKafkaProducer

from core.settings import Settings
from tests.processes import TallyProcess, tally_process

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "infra" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
GRAFANA_DIR = ROOT / "infra" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "tally.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "tally.yml"

INSTALL_HINT = (
    "{tool} is not installed. It comes with Debian's `prometheus` package: run `make promtool` (what "
    ".ci/run does), or `sudo apt-get install -y --no-install-recommends prometheus`; elsewhere, put "
    "promtool and prometheus from a Prometheus release on PATH."
)


def tool(name: str) -> str:
    """The path of `promtool` or `prometheus`; a missing one fails the test (never a skip)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(INSTALL_HINT.format(tool=name), pytrace=False)
    return path


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, rows' nested (collapsed) panels included."""
    out: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]


# Grafana's built-in interval variables, as a range they stand for when a query runs outside Grafana.
GRAFANA_RANGES = ("$__rate_interval", "$__interval", "$__range")


def without_grafana_variables(expr: str, interval: str = "5m") -> str:
    for name in GRAFANA_RANGES:
        expr = expr.replace(name, interval)
    return expr


# --- Metric names in PromQL --------------------------------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")  # label matchers: label names and values, never metric names
_RANGES = re.compile(r"\[[^\[\]]*\]")  # [5m], [$__rate_interval], subqueries' [10m:1m]
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")  # label lists
# An identifier not glued to a word, a number (the `m` of `5m`, the `e3` of `1e3`) or a Grafana `$variable`.
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
KEYWORDS = frozenset(
    {
        # binary operators and modifiers
        "and",
        "or",
        "unless",
        "atan2",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        # aggregations (written `sum by (x) (...)`, so not always followed by a parenthesis)
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        # literals
        "inf",
        "nan",
        "Inf",
        "NaN",
    }
)
# Series Prometheus makes itself, not scraped from any process.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS", "ALERTS_FOR_STATE"})


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions (followed by
    a parenthesis), keywords, or label names (inside matchers and by/on/... lists)."""
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = _RANGES.sub("[]", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.groups()
        if call is None and name not in KEYWORDS:
            names.add(name)
    return names


# --- Metric names in a /metrics scrape ------------------------------------------------------

_SAMPLE_NAME = re.compile(r"[A-Za-z_:][\w:]*")


@dataclass
class Exposition:
    names: dict[str, str]  # every name a query can select -> its family's TYPE
    sampled: set[str]  # the names with at least one sample

    def merge(self, other: Exposition) -> Exposition:
        return Exposition({**self.names, **other.names}, self.sampled | other.sampled)


def exposition(text: str) -> Exposition:
    """Names as Prometheus stores them: a counter's TYPE line already ends in _total (text format
    0.0.4); a histogram `h` is stored as h_bucket, h_sum and h_count, a summary as h, h_sum, h_count.
    A labelled metric with no child yet has only its HELP and TYPE lines: named, not sampled."""
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}
    names: dict[str, str] = {}
    sampled: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            for suffix in suffixes.get(kind, ("",)):
                names[family + suffix] = kind
        elif line and not line.startswith("#"):
            match = _SAMPLE_NAME.match(line)
            assert match, f"not a sample line: {line!r}"
            sampled.add(match.group())
            names.setdefault(match.group(), "untyped")
    return Exposition(names, sampled)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


# --- Tally's processes, with activity behind every metric that activity can produce -----------

VALID = 30
REJECTED = {"type": 2, "ts": 1}  # reason -> events, invalid in otherwise accepted batches


@dataclass
class Stack:
    settings: Settings
    ingest: TallyProcess
    consumer: TallyProcess
    query: TallyProcess

    @property
    def processes(self) -> tuple[TallyProcess, ...]:
        return (self.ingest, self.consumer, self.query)


def start_stack(settings: Settings, tmp: Path) -> Iterator[Stack]:
    """`tally ingest`, `tally consume`, `tally query`; stopped (SIGTERM) when the generator closes."""
    started: list[TallyProcess] = []
    try:
        for command in ("ingest", "consume", "query"):
            started.append(tally_process(command, settings, tmp).start())
        yield Stack(settings, *started)
    finally:
        for process in reversed(started):
            process.stop()


def batch(valid: int, rejected: dict[str, int], tag: str) -> list[dict[str, Any]]:
    """`valid` page views plus invalid events: reason "type" (a type with a space), "ts" (not a time)."""
    events: list[dict[str, Any]] = [
        {"type": "page_view", "source": "web", "properties": {"path": f"/{tag}/{i}", "country": "DE", "amount": i}}
        for i in range(valid)
    ]
    events += [{"type": "has space"}] * rejected.get("type", 0)
    events += [{"type": "x", "ts": "yesterday"}] * rejected.get("ts", 0)
    assert set(rejected) <= {"type", "ts"}
    return events


async def post_events(http: httpx.AsyncClient, valid: int, rejected: dict[str, int]) -> None:
    response = await http.post("/v1/events", json={"events": batch(valid, rejected, uuid.uuid4().hex[:6])})
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] == valid
    assert len(response.json()["rejected"]) == sum(rejected.values())


async def produce_undecodable(settings: Settings, count: int) -> None:
    """Records that are not envelopes: the consumer dead-letters them (reason "undecodable")."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", enable_idempotence=False)
    await producer.start()
    try:
        for _ in range(count):
            await producer.send_and_wait(settings.topic, b"not an envelope", partition=0)
    finally:
        await producer.stop()


async def query_twice(port: int) -> None:
    """The same rollup query twice: a miss that computes, then a hit."""
    params = {"from": "-1h", "to": "now", "granularity": "minute", "fields": "type,count"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        first = await http.get("/v1/rollups/events_by_type", params=params)
        again = await http.get("/v1/rollups/events_by_type", params=params)
    assert first.status_code == again.status_code == 200, first.text
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")


async def until(check: Any, what: str, timeout: float = 30.0, interval: float = 0.2) -> Any:
    """Poll `check()` (sync or async) until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")
