"""infra/prometheus and infra/grafana: promtool accepts the config and the rules, the rules' unit
tests pass and cover every alert both ways, the dashboard is well formed, and every metric an alert
or a panel names is one that Tally's running processes really export."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from core.settings import Settings
from tests.infra.support import (
    ALERTS,
    ALERTS_TEST,
    DASHBOARD_PROVIDERS,
    DATASOURCES,
    GRAFANA_RANGES,
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    PROMETHEUS_SERIES,
    REJECTED,
    VALID,
    Exposition,
    Stack,
    alert_rules,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    exposition,
    load_yaml,
    metric_names,
    post_events,
    produce_undecodable,
    promtool,
    query_twice,
    scrape,
    start_stack,
    until,
    without_grafana_variables,
)
from tests.processes import tally_process

# The compose stack's services and ports (docker-compose.yml), and the jobs alerts and panels select.
COMPOSE_TARGETS = {
    "ingest": ["ingest-1:8000", "ingest-2:8000"],
    "query": ["query-1:8001", "query-2:8001"],
    "consumer": ["consumer-1:9101", "consumer-2:9101"],
    "prometheus": ["localhost:9090"],
}
SEVERITIES = {"critical", "warning", "info"}
# Metrics that only a fault gives samples (Kafka refusing writes): the scrape must still name them.
FAULT_ONLY = {"tally_ingest_backpressure_total"}


def used_metrics() -> dict[str, set[str]]:
    """metric name -> where it is used ("alert X", "panel Y")."""
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for title, expr in dashboard_exprs():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(f"panel {title!r}")
    return used


# --- promtool ----------------------------------------------------------------------------------


def test_promtool_check_config() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {PROMETHEUS_CONFIG} is valid prometheus config file syntax" in result.stdout
    assert "SUCCESS: 1 rule files found" in result.stdout  # rule_files resolves to alerts.yml beside it


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", ALERTS_TEST.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("SUCCESS"), result.stdout


def test_rule_tests_fire_and_silence_every_alert() -> None:
    """Each alert has a case where it fires and a case where it is expected silent."""
    spec = load_yaml(ALERTS_TEST)
    assert spec["rule_files"] == [ALERTS.name]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in spec["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - fired == set(), "alerts no test fires"
    assert alerts - silent == set(), "alerts no test keeps silent"
    assert (fired | silent) - alerts == set(), "tests of alerts that do not exist"


def test_alert_rules_are_labelled_and_explained() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key, "").strip(), f"{rule['alert']}: no {key}"
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]


def test_prometheus_scrapes_every_compose_service() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == [ALERTS.name]
    jobs = {
        job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]]
        for job in config["scrape_configs"]
    }
    assert jobs == COMPOSE_TARGETS
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])


def test_job_selectors_name_configured_jobs() -> None:
    """A `job="..."` in an alert or a panel that no scrape config defines would match nothing."""
    jobs = {job["job_name"] for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    exprs = [rule["expr"] for rule in alert_rules()] + [expr for _, expr in dashboard_exprs()]
    selected: set[str] = set()
    for expr in exprs:
        for op, value in re.findall(r'\bjob\s*(=~|=)\s*"([^"]*)"', expr):
            selected.update(value.split("|") if op == "=~" else [value])
    assert selected, "no job selectors found: the regex is broken"
    assert selected <= jobs


# --- Grafana -----------------------------------------------------------------------------------


def test_grafana_provisioning() -> None:
    datasources = load_yaml(DATASOURCES)["datasources"]
    assert [(d["uid"], d["type"], d["url"]) for d in datasources] == [
        ("prometheus", "prometheus", "http://prometheus:9090")
    ]
    providers = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert [(p["type"], p["options"]["path"]) for p in providers] == [("file", "/var/lib/grafana/dashboards")]


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    uid = load_yaml(DATASOURCES)["datasources"][0]["uid"]
    assert board["uid"] == "tally" and board["title"] and board["schemaVersion"] >= 36
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine, f"{panel['title']!r} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":  # a row is a header: no query of its own
            assert "targets" not in panel, panel["title"]
            continue
        assert panel["title"] and panel.get("description"), panel["id"]
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no targets"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert target["expr"].strip(), panel["title"]
            unknown = set(re.findall(r"\$\w+", target["expr"])) - set(GRAFANA_RANGES)
            assert not unknown, f"{panel['title']!r}: variables the dashboard does not define: {unknown}"


def test_dashboard_covers_the_pipeline() -> None:
    used = used_metrics()
    panels_of = {name: {w for w in where if w.startswith("panel ")} for name, where in used.items()}
    for name in (
        "tally_ingest_events_accepted_total",
        "tally_ingest_events_rejected_total",
        "tally_ingest_backpressure_total",
        "tally_http_requests_total",
        "tally_kafka_produce_seconds_bucket",
        "tally_consumer_lag_records",
        "tally_consumer_lag_seconds",
        "tally_consumer_events_applied_total",
        "tally_consumer_batch_seconds_bucket",
        "tally_dlq_records_total",
        "tally_query_seconds_bucket",
        "tally_query_cache_total",
        "tally_db_pool_connections_in_use",
        "up",
    ):
        assert panels_of.get(name), f"no panel shows {name}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel query, as a recording rule (Grafana's $__rate_interval made 5m)."""
    exprs = dashboard_exprs()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": without_grafana_variables(expr)}
                    for i, (_, expr) in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


# --- Metric names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('up{job=~"ingest|query"} == 0', {"up"}),
        ("sum by (topic) (tally_consumer_lag_records) > 100000", {"tally_consumer_lag_records"}),
        (
            'histogram_quantile(0.99, sum by (le) (rate(tally_query_seconds_bucket{outcome!="stream"}[5m]))) > 0.5',
            {"tally_query_seconds_bucket"},
        ),
        (
            "sum(rate(a_total[$__rate_interval])) / on (job) group_left (instance) sum(rate(b_count[1m] offset 1h))",
            {"a_total", "b_count"},
        ),
        ('max without (le, instance) (x_bucket{le="+Inf", name="sum"}) > bool 1e3', {"x_bucket"}),
        (
            "deriv(tally_consumer_lag_records[10m:1m]) and tally_x unless count(y) or avg(z)",
            {"tally_consumer_lag_records", "tally_x", "y", "z"},
        ),
        ('label_replace(m, "dst", "$1", "src", "(.*)") * ignoring(a) n', {"m", "n"}),
        ("sum(x) by (service, route)", {"x"}),
        ('tally_a{service="query",route="/v1/rollups/{name}"}', {"tally_a"}),
    ],
)
def test_metric_names_in_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_exposition_names_map_suffixes() -> None:
    text = "\n".join(
        [
            "# HELP a_total A",
            "# TYPE a_total counter",
            'a_total{x="1"} 2.0',
            "a_created 1.7e9",
            "# HELP h H",
            "# TYPE h histogram",
            "# HELP g G",
            "# TYPE g gauge",
            "g 1.0",
            "# HELP s S",
            "# TYPE s summary",
        ]
    )
    seen = exposition(text)
    assert seen.names == {
        "a_total": "counter",
        "a_created": "untyped",
        "h_bucket": "histogram",
        "h_sum": "histogram",
        "h_count": "histogram",
        "g": "gauge",
        "s": "summary",
        "s_sum": "summary",
        "s_count": "summary",
    }
    assert seen.sampled == {"a_total", "a_created", "g"}


@pytest.fixture
def stack(migrated: Settings, tmp_path: Path) -> Iterator[Stack]:
    yield from start_stack(migrated.model_copy(update={"lag_sample_seconds": 0.5}), tmp_path)


async def test_every_metric_used_is_exported_by_the_live_processes(
    stack: Stack, migrated: Settings, tmp_path: Path
) -> None:
    """Scrape real `tally ingest|consume|query` processes after traffic that touches every metric but a
    Kafka fault's: every name an alert or a panel selects is exposed (HELP/TYPE at least), and all but
    FAULT_ONLY have samples. `up` is Prometheus's own."""
    used = used_metrics()
    assert len(used) >= 25  # the extractor found the names; a broken regex would find few

    # Ingest: accepted and rejected events. An auth-on ingest refuses a request without a key.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.ingest.port}", timeout=30) as http:
        await post_events(http, VALID, REJECTED)
    guarded = tally_process("ingest", migrated.model_copy(update={"auth": True}), tmp_path).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{guarded.port}", timeout=30) as http:
            assert (await http.post("/v1/events", json=[{"type": "a"}])).status_code == 401
        guarded_text = scrape(guarded.port)
    finally:
        guarded.stop()
    # Consumer: applies the events, dead-letters a record that is not an envelope.
    await produce_undecodable(stack.settings, 1)

    def applied() -> bool:
        return 'tally_dlq_records_total{reason="undecodable"} 1.0' in scrape(stack.consumer.port) and (
            f"tally_consumer_events_applied_total {float(VALID)}" in scrape(stack.consumer.port)
        )

    await until(applied, "the consumer to apply the events and dead-letter the bad record")
    # Query: a miss and a hit; the lag sampler's verdicts.
    await query_twice(stack.query.port)
    await until(lambda: "tally_consumer_group_status{" in scrape(stack.query.port), "a lag verdict")

    seen = exposition(guarded_text)
    for process in stack.processes:
        seen = seen.merge(exposition(scrape(process.port)))
    check_names(used, seen)


def check_names(used: dict[str, set[str]], seen: Exposition) -> None:
    missing = {name: sorted(where) for name, where in used.items() if name not in seen.names.keys() | PROMETHEUS_SERIES}
    assert not missing, f"not exported by any Tally process: {missing}"
    unsampled = {name for name in used if name not in seen.sampled | PROMETHEUS_SERIES | FAULT_ONLY}
    assert not unsampled, f"exported but never sampled during the test's traffic: {sorted(unsampled)}"
    for name in used:
        kind = seen.names.get(name)
        if name.endswith(("_bucket", "_sum", "_count")) and kind == "histogram":
            continue
        assert kind in {"counter", "gauge", "untyped", None}, (name, kind)
        if name.endswith("_total"):
            assert kind == "counter", (name, kind)
    sampled_fault_only = FAULT_ONLY & seen.sampled
    assert not sampled_fault_only, f"{sampled_fault_only} had samples: drop them from FAULT_ONLY"
