"""infra/nginx/nginx.conf: agrees with compose and Tally's settings, passes `nginx -t`, and,
run for real (Debian's nginx) in front of real `tally ingest` processes, balances them, passes
request ids, refuses oversized bodies, retries a GET on the other replica and never a POST.

The config's upstream host names (ingest-1 ...) exist only on the compose network: the tests
run a copy in which they, the listen ports and the log and temp paths are local.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from core import devstack
from core.settings import Settings
from tests.processes import tally_process

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "infra" / "nginx" / "nginx.conf"
COMPOSE_FILE = ROOT / "docker-compose.yml"
UPSTREAMS = {"tally_ingest": ("ingest", "ingest_port"), "tally_query": ("query", "query_port")}
HEX_ID = re.compile(r"[0-9a-f]{32}")


def nginx() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if path is None:
        pytest.fail(
            "nginx is not installed. Debian's `nginx` package has it: `sudo apt-get install -y "
            "--no-install-recommends nginx` (`make infra-tools` does, and .ci/run calls it).",
            pytrace=False,
        )
    return path


def conf() -> str:
    return CONF.read_text()


def upstream_servers(text: str) -> dict[str, list[str]]:
    """upstream name -> the `server` addresses in it."""
    return {
        name: re.findall(r"^\s*server\s+(\S+?)[\s;]", body, re.M)
        for name, body in re.findall(r"upstream\s+(\w+)\s*\{(.*?)\}", text, re.S)
    }


def directive(text: str, name: str) -> list[str]:
    return [value.strip() for value in re.findall(rf"^\s*{name}\s+([^;]*);", text, re.M)]


# --- What the config says -----------------------------------------------------------------


def test_upstreams_are_the_compose_replicas_on_their_ports() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    defaults = Settings()
    for upstream, (role, port_field) in UPSTREAMS.items():
        replicas = sorted(n for n, s in services.items() if (s.get("command") or [None])[0] == role)
        assert len(replicas) >= 2
        port = getattr(defaults, port_field)
        assert sorted(upstream_servers(conf())[upstream]) == [f"{r}:{port}" for r in replicas]
    ports = sorted(int(p) for p in directive(conf(), "listen"))
    nginx_service = services["nginx"]
    assert ports == sorted(int(p.split(":")[-1]) for p in nginx_service["ports"]) == [8000, 8001]
    assert any(target == "/etc/nginx/nginx.conf" for target in (v.split(":")[1] for v in nginx_service["volumes"]))


def test_the_body_limit_is_tallys() -> None:
    (limit,) = directive(conf(), "client_max_body_size")
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", limit).groups()  # type: ignore[union-attr]
    size = int(number) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit.lower()]
    assert size == Settings().max_body_bytes, "nginx would refuse what Tally accepts, or buffer what it refuses"
    assert f"larger than {size} bytes" in conf(), "the 413 problem names the limit"


def test_posts_are_never_resent_and_connections_are_kept_alive() -> None:
    text = conf()
    for value in directive(text, "proxy_next_upstream"):
        assert "non_idempotent" not in value.split(), "a POST would be sent to a second replica"
        assert "http_503" not in value.split(), "a 503 is an answer (overload, draining), not a dead replica"
    assert directive(text, "proxy_http_version") == ["1.1"]
    assert 'Connection ""' in directive(text, "proxy_set_header")
    for name, body in re.findall(r"upstream\s+(\w+)\s*\{(.*?)\}", text, re.S):
        assert re.search(r"^\s*keepalive\s+\d+;", body, re.M), f"{name}: no keep-alive pool"
        (timeout,) = re.findall(r"^\s*keepalive_timeout\s+(\d+)s;", body, re.M)
        assert int(timeout) < 5, f"{name}: must close idle connections before uvicorn's 5 s keep-alive does"
    assert "X-Request-Id $tally_request_id" in directive(text, "proxy_set_header")


# --- Running it -------------------------------------------------------------------------


@dataclass
class Proxy:
    ingest_url: str
    query_url: str
    access_log: Path
    error_log: Path

    def logged(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line]


def local_copy(tmp: Path, servers: dict[str, str], ports: dict[int, int]) -> Path:
    """The config with upstream servers, listen ports, logs, pid and temp files made local."""
    text = conf()
    for name, address in servers.items():
        text, n = re.subn(rf"(^\s*server\s+){re.escape(name)}(\s)", rf"\g<1>{address}\2", text, flags=re.M)
        assert n == 1, name
    for port, local in ports.items():
        text, n = re.subn(rf"^(\s*listen\s+){port};", rf"\g<1>127.0.0.1:{local};", text, flags=re.M)
        assert n == 1, port
    text = text.replace("access_log /dev/stdout tally;", f"access_log {tmp}/access.log tally;")
    text = text.replace("error_log stderr warn;", f"error_log {tmp}/error.log info;")
    temp = "".join(
        f"    {kind}_temp_path {tmp}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", "http {\n" + temp, 1)
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers would run as nobody, locked out of tmp
    path = tmp / "nginx.conf"
    path.write_text(f"pid {tmp}/nginx.pid;\n{user}{text}")
    return path


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    names = [s for servers in upstream_servers(conf()).values() for s in servers]
    servers = {name: f"127.0.0.1:{20000 + i}" for i, name in enumerate(names)}
    path = local_copy(tmp_path, servers, {8000: devstack.free_port(), 8001: devstack.free_port()})
    result = subprocess.run(
        [nginx(), "-t", "-p", str(tmp_path), "-c", str(path)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


@contextlib.contextmanager
def run_nginx(tmp: Path, servers: dict[str, str]) -> Iterator[Proxy]:
    unused = {name: f"127.0.0.1:{devstack.free_port()}" for name in ("query-1:8001", "query-2:8001")}
    ingest_port, query_port = devstack.free_port(), devstack.free_port()
    path = local_copy(tmp, {**unused, **servers}, {8000: ingest_port, 8001: query_port})
    with (tmp / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen([nginx(), "-p", str(tmp), "-c", str(path), "-g", "daemon off;"], stderr=stderr)
    try:
        devstack.wait_for_port(ingest_port, 10, process)
        yield Proxy(
            f"http://127.0.0.1:{ingest_port}", f"http://127.0.0.1:{query_port}", tmp / "access.log", tmp / "error.log"
        )
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful, as `docker stop` does it (stop_signal)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_SAMPLE = re.compile(r"^tally_http_requests_total\{([^}]*)\} (\S+)$", re.M)


def requests_seen(port: int, method: str, route: str) -> dict[str, float]:
    """status -> requests one Tally process counted for the route, from its own /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for labels, value in _SAMPLE.findall(text):
        parsed = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if parsed["method"] == method and parsed["route"] == route:
            out[parsed["status"]] = out.get(parsed["status"], 0.0) + float(value)
    return out


@pytest.mark.integration
async def test_nginx_balances_passes_request_ids_and_guards_the_port(migrated: Settings, tmp_path: Path) -> None:
    replicas = [tally_process("ingest", migrated, tmp_path).start() for _ in range(2)]
    try:
        servers = {f"ingest-{i + 1}:8000": f"127.0.0.1:{p.port}" for i, p in enumerate(replicas)}
        with run_nginx(tmp_path, servers) as proxy:
            async with httpx.AsyncClient(base_url=proxy.ingest_url, timeout=30) as http:
                for _ in range(20):
                    response = await http.post("/v1/events", json={"events": [{"type": "lb"}]})
                    assert response.status_code == 202, response.text
                # Round robin: both replicas take their share (with keep-alive connections to both).
                accepted = [requests_seen(p.port, "POST", "/v1/events").get("202", 0) for p in replicas]
                assert accepted == [10, 10], accepted

                # A sane client id goes through to the app (which echoes it) ...
                response = await http.post(
                    "/v1/events", json=[{"type": "id"}], headers={"X-Request-Id": "client-id-42"}
                )
                assert response.headers["x-request-id"] == "client-id-42"
                # ... otherwise nginx makes one, and the app uses that one (it is in nginx's log).
                for sent in ({}, {"X-Request-Id": "x" * 200}, {"X-Request-Id": "has space"}):
                    response = await http.post("/v1/events", json=[{"type": "id"}], headers=sent)
                    assert response.status_code == 202
                    made = response.headers["x-request-id"]
                    assert HEX_ID.fullmatch(made), made
                    assert made in {line["request_id"] for line in proxy.logged()}

                # Too large: refused by nginx as a problem, before any replica reads it.
                before = [sum(requests_seen(p.port, "POST", "/v1/events").values()) for p in replicas]
                too_large = b"[" + b" " * migrated.max_body_bytes + b"]"
                response = await http.post(
                    "/v1/events", content=too_large, headers={"content-type": "application/json"}
                )
                assert response.status_code == 413
                assert response.headers["content-type"] == "application/problem+json"
                assert response.json()["status"] == 413
                assert [sum(requests_seen(p.port, "POST", "/v1/events").values()) for p in replicas] == before

                # Metrics stay off the public port; the balancer answers its own /healthz.
                assert (await http.get("/metrics")).status_code == 404
                health = await http.get("/healthz")
                assert (health.status_code, health.text) == (200, "ok\n")
                assert (await http.get("/readyz")).json()["ready"] is True  # a replica's, through nginx
    finally:
        for process in replicas:
            process.stop()


@dataclass
class CrashingUpstream:
    """A replica that dies mid-request: it reads the whole request, then resets the connection."""

    address: str = ""
    seen: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def serve(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                if not head:
                    continue
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                while length and len(body) < int(length.group(1)):
                    body += conn.recv(65536)
                method, path = head.split(b" ")[:2]
                self.seen.append(f"{method.decode()} {path.decode()}")
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, as a kill


@contextlib.contextmanager
def crashing_upstream() -> Iterator[CrashingUpstream]:
    upstream = CrashingUpstream()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    upstream.address = f"127.0.0.1:{listener.getsockname()[1]}"
    thread = threading.Thread(target=upstream.serve, args=(listener,), daemon=True)
    thread.start()
    try:
        yield upstream
    finally:
        upstream._stop.set()
        thread.join(5)
        listener.close()


@pytest.mark.integration
async def test_a_get_is_retried_on_the_other_replica_and_a_post_never(migrated: Settings, tmp_path: Path) -> None:
    real = tally_process("ingest", migrated, tmp_path).start()
    try:
        with crashing_upstream() as crashing:
            servers = {"ingest-1:8000": crashing.address, "ingest-2:8000": f"127.0.0.1:{real.port}"}

            (tmp_path / "get").mkdir()
            before = requests_seen(real.port, "GET", "/readyz").get("200", 0)
            with run_nginx(tmp_path / "get", servers) as proxy:
                async with httpx.AsyncClient(base_url=proxy.ingest_url, timeout=30) as http:
                    statuses = [(await http.get("/readyz")).status_code for _ in range(4)]
            assert statuses == [200] * 4
            # Round robin sent the first GET to the crashing replica; nginx passed it on.
            assert crashing.seen == ["GET /readyz"]
            assert requests_seen(real.port, "GET", "/readyz").get("200", 0) - before == 4

            crashing.seen.clear()
            (tmp_path / "post").mkdir()
            with run_nginx(tmp_path / "post", servers) as proxy:  # a new nginx: no failures remembered
                async with httpx.AsyncClient(base_url=proxy.ingest_url, timeout=30) as http:
                    answers = [await http.post("/v1/events", json=[{"type": "once"}]) for _ in range(6)]
            statuses = [a.status_code for a in answers]
            # The POST the crashing replica took is answered 502 (ambiguous: retry with the same
            # Idempotency-Key), and was not sent to the live replica as well.
            assert crashing.seen == ["POST /v1/events"]
            assert statuses == [502] + [202] * 5, statuses
            assert answers[0].headers["content-type"] == "application/problem+json"
            assert answers[0].headers["retry-after"] == "1"
            assert requests_seen(real.port, "POST", "/v1/events") == {"202": 5}
    finally:
        real.stop()
