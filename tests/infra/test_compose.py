"""docker-compose.yml, checked without a Docker engine (there is none on CI).

Two ways: Debian's `docker-compose` (1.29, Python) runs `config` offline, validating the file
against the compose-spec JSON schema it ships and resolving `${VAR}` from .env.example; and
the structural checks below on the same file: the services the stack needs, health checks,
the start-up order, settings that Tally really has, no secrets, volumes, mounts and ports.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

SERVERS = {"kafka", "postgres", "redis"}
INGEST = {"ingest-1", "ingest-2"}
QUERY = {"query-1", "query-2"}
CONSUMERS = {"consumer-1", "consumer-2"}
TALLY_LONG_RUNNING = INGEST | QUERY | CONSUMERS
EXPECTED = SERVERS | {"migrate"} | TALLY_LONG_RUNNING | {"nginx", "prometheus", "grafana"}
ONE_SHOT = {"migrate"}
# Where each role listens: the settings' defaults, unless a service overrides them.
ROLE_PORT_FIELD = {"ingest": "ingest_port", "query": "query_port", "consume": "consumer_metrics_port"}
STATEFUL = {"kafka": "/var/lib/kafka/data", "postgres": "/var/lib/postgresql/data", "redis": "/data"}

INSTALL_HINT = (
    "{tool} is not installed. Debian's `{package}` package has it: "
    "`sudo apt-get install -y --no-install-recommends {package}` (`make infra-tools` does, and .ci/run calls it)."
)


def tool(name: str, package: str) -> str:
    """The path of a Debian tool the infra tests use; a missing one fails the test (never a skip)."""
    path = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
    if path is None:
        pytest.fail(INSTALL_HINT.format(tool=name, package=package), pytrace=False)
    return path


# --- The file, with ${VAR} resolved the way Compose does -------------------------------------

_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} and $$, recursively."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.groups()
        present = name in env and (env[name] != "" or op is None or not op.startswith(":"))
        if present:
            return env[name]
        if op and op.endswith("?"):
            raise KeyError(f"{name} is required: {arg}")
        return arg if op else ""

    return _VARIABLE.sub(one, value)


def strings(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, str):
        yield value


def raw() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(interpolate(raw(), env_file(ENV_EXAMPLE)))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def role(service: dict[str, Any]) -> str | None:
    command = service.get("command")
    return command[0] if isinstance(command, list) and command and command[0] in ROLE_PORT_FIELD else None


def settings_of(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a Tally container gets: its environment (plus the image's ENV), nothing else."""
    for key in list(os.environ):
        if key.startswith("TALLY_"):
            monkeypatch.delenv(key)
    for key, value in environment(service).items():
        monkeypatch.setenv(key, value)
    return Settings()


def seconds(duration: str) -> float:
    """A Compose duration: 1m30s, 45s, 500ms."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(n) * units[u] for n, u in parts)


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def clean_env(tmp_path: Path) -> dict[str, str]:
    """Only PATH and HOME: Compose would otherwise take POSTGRES_PASSWORD & co. from the shell."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}


# --- The real tool ---------------------------------------------------------------------------


def docker_compose(tmp_path: Path, *args: str, env_file_path: Path = ENV_EXAMPLE) -> subprocess.CompletedProcess[str]:
    command = [tool("docker-compose", "docker-compose"), "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE)]
    return subprocess.run(
        [*command, "--env-file", str(env_file_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(tmp_path),
        check=False,
    )


def test_docker_compose_validates_the_file_offline(tmp_path: Path, services: dict[str, dict[str, Any]]) -> None:
    result = docker_compose(tmp_path, "config", "--quiet")
    assert result.returncode == 0, result.stderr
    # What Compose resolved is what the checks below read (same services, same environments).
    resolved = yaml.safe_load(docker_compose(tmp_path, "config").stdout)["services"]
    assert set(resolved) == set(services)
    for name, service in services.items():
        assert environment(resolved[name]) == environment(service), name


def test_docker_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = docker_compose(tmp_path, "config", "--quiet", env_file_path=empty)
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def test_docker_compose_rejects_a_typo(tmp_path: Path) -> None:
    """The schema check is real: a misspelt key (a health check that would silently not exist) fails."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    healthcheck:\n", "    helthcheck:\n", 1))
    result = subprocess.run(
        [
            tool("docker-compose", "docker-compose"),
            "--project-directory",
            str(ROOT),
            "-f",
            str(broken),
            "--env-file",
            str(ENV_EXAMPLE),
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(tmp_path),
        check=False,
    )
    assert result.returncode != 0 and "helthcheck" in result.stderr


# --- Services, health, order -----------------------------------------------------------------


def test_every_service_of_the_stack_is_there(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == EXPECTED
    for name in TALLY_LONG_RUNNING | ONE_SHOT:
        assert services[name]["image"] == services["migrate"]["image"], f"{name}: one image for every role"
    assert {role(services[n]) for n in INGEST} == {"ingest"}
    assert {role(services[n]) for n in QUERY} == {"query"}
    assert {role(services[n]) for n in CONSUMERS} == {"consume"}
    assert services["migrate"]["command"] == ["migrate"]


def test_every_long_running_service_has_a_health_check_and_restarts(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", f"{name} runs once"
            assert "healthcheck" not in service
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert service.get("restart") == "unless-stopped", name


def test_tally_health_checks_ask_readyz_on_their_own_port(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The image is python:*-slim (no curl): the check must be Python's urllib.
    assert re.search(r"^FROM python:[\w.-]+\s*$", (ROOT / "Dockerfile").read_text(), re.M)
    for name in TALLY_LONG_RUNNING:
        service = services[name]
        port = getattr(settings_of(service, monkeypatch), ROLE_PORT_FIELD[role(service) or ""])
        test = service["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"], name
        assert f"http://127.0.0.1:{port}/readyz" in test[3], name
        assert str(port) in service.get("expose", []), f"{name} does not expose {port}"


@pytest.fixture
def fake_readyz() -> Iterator[dict[str, Any]]:
    """A local server whose /readyz answers the status the test sets."""
    state: dict[str, Any] = {"status": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(state["status"] if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state["port"] = server.server_address[1]
    yield state
    server.shutdown()
    server.server_close()


def test_the_health_check_command_fails_on_a_503(
    services: dict[str, dict[str, Any]], fake_readyz: dict[str, Any]
) -> None:
    """Run the compose health check itself: healthy on 200, unhealthy on 503 (draining) or no answer."""
    code = services["ingest-1"]["healthcheck"]["test"][3].replace("127.0.0.1:8000", f"127.0.0.1:{fake_readyz['port']}")

    def exit_status() -> int:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=False).returncode

    assert exit_status() == 0
    fake_readyz["status"] = 503
    assert exit_status() != 0


def test_start_up_order_servers_then_migrate_then_apps_then_nginx(services: dict[str, dict[str, Any]]) -> None:
    graph = {name: depends_on(service) for name, service in services.items()}
    for name, deps in graph.items():
        for dep, condition in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no check"
            if condition == "service_completed_successfully":
                assert dep in ONE_SHOT, f"{name} waits for {dep} to exit"

    # Levels of a topological order; a cycle leaves services unplaced.
    level: dict[str, int] = {}
    while len(level) < len(graph):
        ready = [n for n, deps in graph.items() if n not in level and all(d in level for d in deps)]
        assert ready, f"dependency cycle among {sorted(set(graph) - set(level))}"
        for n in ready:
            level[n] = 1 + max((level[d] for d in graph[n]), default=-1)

    assert all(not graph[s] for s in SERVERS), "Kafka, Postgres and Redis wait for nothing"
    assert graph["migrate"] == {"kafka": "service_healthy", "postgres": "service_healthy"}
    for name in TALLY_LONG_RUNNING:
        assert graph[name].get("migrate") == "service_completed_successfully", name
    for name in INGEST | QUERY:
        assert graph[name].get("redis") == "service_healthy", f"{name} uses Redis from its first request"
    assert graph["nginx"] == dict.fromkeys(INGEST | QUERY, "service_healthy")
    assert graph["grafana"] == {"prometheus": "service_healthy"}
    assert max(level[s] for s in SERVERS) < level["migrate"] < min(level[n] for n in TALLY_LONG_RUNNING)
    assert max(level[n] for n in INGEST | QUERY) < level["nginx"]


# --- Settings, secrets ---------------------------------------------------------------------


def test_tally_services_set_only_real_settings_and_start(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = {f"TALLY_{name.upper()}" for name in Settings.model_fields}
    for name in TALLY_LONG_RUNNING | ONE_SHOT:
        env = environment(services[name])
        unknown = {key for key in env if key.startswith("TALLY_")} - fields
        assert not unknown, f"{name} sets variables Tally does not read: {sorted(unknown)}"
        assert {key for key in env if not key.startswith("TALLY_")} <= {"PROMETHEUS_MULTIPROC_DIR"}, name
        settings = settings_of(services[name], monkeypatch)  # values that parse (types, enums)
        settings.require("kafka_bootstrap", "postgres_url", "redis_url")
        settings.require_secrets()  # prod with a cursor secret of its own
        assert settings.env == "prod" and settings.auth, name
        assert settings.bind_host not in ("127.0.0.1", "localhost"), f"{name} must listen beyond its loopback"


def test_the_same_settings_on_every_replica(services: dict[str, dict[str, Any]]) -> None:
    envs = [environment(services[n]) for n in sorted(TALLY_LONG_RUNNING | ONE_SHOT)]
    assert all(env == envs[0] for env in envs), "replicas and migrate must agree (topic, partitions, secret)"


def test_secrets_come_from_env_and_never_from_the_file() -> None:
    required = {m.group(1) for text in strings(raw()) for m in _VARIABLE.finditer(text) if m.group(2) == ":?"}
    example = env_file(ENV_EXAMPLE)
    assert required == set(example), ".env.example must list exactly the variables the file requires"
    assert all("change-me" in value for value in example.values()), "placeholders only in .env.example"
    assert ".env" in (ROOT / ".gitignore").read_text().split(), ".env holds the real secrets: never commit it"

    secretish = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|CREDENTIALS", re.I)
    for name, service in raw()["services"].items():
        for key, value in environment(service).items():
            if secretish.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", value), f"{name}: {key} must be ${{VAR:?}} from .env"
            for user_password in re.findall(r"://[^/@\s]*:([^/@\s]+)@", value):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", user_password), f"{name}: password in {key}"


# --- Volumes, mounts, ports ----------------------------------------------------------------


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for volume in service.get("volumes", []):
        source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
        out.append((source, target))
    return out


def test_data_lives_in_named_volumes(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose.get("volumes") or {})
    used = {source for s in services.values() for source, _ in mounts(s) if not source.startswith((".", "/"))}
    assert used == declared, "every named volume is declared, and every declared one is used"
    for name, path in {**STATEFUL, "prometheus": "/prometheus", "grafana": "/var/lib/grafana"}.items():
        assert any(t == path and s in declared for s, t in mounts(services[name])), f"{name} keeps {path} in a volume"
    # Kafka writes where KAFKA_LOG_DIRS says (the image's default is /tmp, lost on every restart).
    assert environment(services["kafka"])["KAFKA_LOG_DIRS"] == STATEFUL["kafka"]
    assert "--appendonly" in services["redis"]["command"], "idempotency keys survive a Redis restart"


def test_mounted_files_exist_where_the_containers_look(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for source, _ in mounts(service):
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repo"

    prometheus = dict(mounts(services["prometheus"]))
    config_dir = prometheus["./infra/prometheus"]
    assert f"--config.file={config_dir}/prometheus.yml" in services["prometheus"]["command"]
    config = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    for rule_file in config.get("rule_files", []):
        assert (ROOT / "infra/prometheus" / rule_file).exists(), rule_file

    grafana = dict(mounts(services["grafana"]))
    assert grafana["./infra/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_dir = grafana["./infra/grafana/dashboards"]
    for provider_file in (ROOT / "infra/grafana/provisioning/dashboards").glob("*.y*ml"):
        for provider in yaml.safe_load(provider_file.read_text())["providers"]:
            assert provider["options"]["path"] == dashboards_dir, "the provider reads where the JSON is mounted"
    home = environment(services["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_dir + "/")
    assert (ROOT / "infra/grafana/dashboards" / home.removeprefix(dashboards_dir + "/")).exists()
    for source_file in (ROOT / "infra/grafana/provisioning/datasources").glob("*.y*ml"):
        for source in yaml.safe_load(source_file.read_text())["datasources"]:
            if source["type"] == "prometheus":
                assert source["url"] == "http://prometheus:9090"


def published(service: dict[str, Any]) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


def test_published_ports(services: dict[str, dict[str, Any]]) -> None:
    # One port per API, both through nginx; no Tally replica is reachable from outside directly.
    assert sorted(published(services["nginx"])) == ["8000:8000", "8001:8001"]
    assert published(services["grafana"]) == ["3000:3000"]
    assert published(services["prometheus"]) == ["127.0.0.1:9090:9090"], "Prometheus has no auth: loopback only"
    others = set(services) - {"nginx", "grafana", "prometheus"}
    assert not [n for n in others if published(services[n])], "only nginx, Grafana and Prometheus publish ports"


def test_prometheus_scrapes_every_tally_process(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    listening = {
        f"{name}:{getattr(settings_of(services[name], monkeypatch), ROLE_PORT_FIELD[role(services[name]) or ''])}"
        for name in TALLY_LONG_RUNNING
    }
    assert listening <= targets, f"not scraped: {sorted(listening - targets)}"
    for target in targets - listening:
        assert target.split(":")[0] in ("localhost", "127.0.0.1"), f"{target} is no service of the stack"


def test_the_console_reads_every_ingest_and_consumer(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TALLY_METRICS_TARGETS names each ingest and consumer replica's /metrics, by its service name."""
    expected = set()
    for name in INGEST | CONSUMERS:
        port = getattr(settings_of(services[name], monkeypatch), ROLE_PORT_FIELD[role(services[name]) or ""])
        expected.add((name, f"http://{name}:{port}/metrics"))
    for name in QUERY:
        assert set(settings_of(services[name], monkeypatch).metrics_target_urls) == expected, name


def test_stop_grace_outlasts_the_drain(services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Docker's SIGKILL after stop_grace_period must come after Tally's drain and grace (and a flush)."""
    for name in TALLY_LONG_RUNNING:
        settings = settings_of(services[name], monkeypatch)
        budget = settings.drain_seconds + settings.shutdown_grace_seconds
        assert seconds(services[name]["stop_grace_period"]) >= budget + 5, name


def test_the_deployment_guide_names_only_real_settings() -> None:
    guide = (ROOT / "docs" / "deployment.md").read_text()
    fields = {f"TALLY_{name.upper()}" for name in Settings.model_fields}
    named = set(re.findall(r"\bTALLY_[A-Z0-9_]*[A-Z0-9]\b", guide))
    assert named and named <= fields, f"not settings: {sorted(named - fields)}"
    for kafka in ("SECURITY_PROTOCOL", "SASL_MECHANISM", "SASL_USERNAME", "SASL_PASSWORD", "SSL_CAFILE"):
        assert f"TALLY_KAFKA_{kafka}" in named, f"managed Kafka needs TALLY_KAFKA_{kafka} documented"
