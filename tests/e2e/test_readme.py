"""README's commands run as written, against `tally dev --demo` as a newcomer starts it.

`tally dev` starts here with nothing configured, as `make dev` does: embedded Tansu,
PostgreSQL and Valkey, ingest, query and a consumer, demo traffic. Only the ports
differ (free ones, so the test can run beside a developer's `make dev`); the blocks'
`localhost:8000`-style ports are rewritten to them, nothing else. Each ```sh block of
README.md then runs in bash (`set -euo pipefail`), in README's order, in the directory
`tally dev` runs in, with no TALLY_* variable set, so each `tally` command must find the
stack through `.tally/env` as a user's would. Every documented JSON answer must appear in
the block's output, shaped as documented (tests/readme_blocks.py). Where README makes a
promise with a number, the test checks that number exactly: the kill -9 walk-through
counts 1,000, the backfilled rollup equals the live one, and the stack survived both.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from core import devenv, devstack
from tests.readme_blocks import Block, shell_blocks, unmatched

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parents[2]
TALLY_COMMAND = re.compile(r"^(?!\s*#).*(?:^|[\s($])tally [a-z]", re.MULTILINE)
BLOCK_TIMEOUT = 150.0  # the slowest block waits for a consumer to rejoin after a kill -9


@dataclass
class DevStack:
    cwd: Path
    ports: dict[int, int]  # README's port -> this stack's
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pg_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.ports[15432]}/postgres"


def _clean_env() -> dict[str, str]:
    """The user's environment: no TALLY_* at all, the virtualenv's `tally` on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def dev_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "core").mkdir()
    shutil.copy(ROOT / "core" / "rollups.toml", cwd / "core" / "rollups.toml")  # the file README edits
    ports = {p: devstack.free_port() for p in (8000, 8001, 9101, 19092, 15432, 16379)}
    env = _clean_env() | {
        "TALLY_INGEST_PORT": str(ports[8000]),
        "TALLY_QUERY_PORT": str(ports[8001]),
        "TALLY_CONSUMER_METRICS_PORT": str(ports[9101]),
        "TALLY_DEV_KAFKA_PORT": str(ports[19092]),
        "TALLY_DEV_POSTGRES_PORT": str(ports[15432]),
        "TALLY_DEV_REDIS_PORT": str(ports[16379]),
        "TALLY_ROLLUPS_FILE": str(cwd / "core" / "rollups.toml"),
        "TALLY_SESSION_TIMEOUT_MS": "6000",  # a killed consumer's partitions move sooner
    }
    log_path = cwd / "tally-dev.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "core.cli", "dev", "--demo", "--demo-rate", "100"],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=devstack._die_with_parent,
        )
    stack = DevStack(cwd, ports, process, log_path)
    deadline = time.monotonic() + 120
    while devenv.running(cwd / ".tally") is None:
        assert process.poll() is None, f"tally dev exited with {process.returncode}:\n{stack.log()[-3000:]}"
        assert time.monotonic() < deadline, f"tally dev never became ready:\n{stack.log()[-3000:]}"
        time.sleep(0.2)
    # "Once make dev is up": the demo's events flow, and the consumer has stored an offset on every
    # partition (before that, /v1/ops/lag's stored_offset is null, as its docs say).
    while not _flowing(ports[8001]):
        assert time.monotonic() < deadline, f"no offsets stored within 120 s:\n{stack.log()[-3000:]}"
        time.sleep(0.5)
    try:
        yield stack
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # Ctrl-C
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _flowing(query_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{query_port}/v1/ops/lag", timeout=5) as response:
            lag = json.load(response)
    except (OSError, ValueError):
        return False
    return all(p["stored_offset"] is not None for p in lag["partitions"])


def _run(block: Block, stack: DevStack) -> str:
    code = block.code
    for readme_port, port in stack.ports.items():
        code = code.replace(f":{readme_port}", f":{port}")
    try:
        done = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + code],
            cwd=stack.cwd, env=_clean_env(), capture_output=True, text=True, timeout=BLOCK_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{block.name} did not finish in {BLOCK_TIMEOUT} s:\n{code}\nstdout:\n{exc.stdout}")
    assert done.returncode == 0, f"{block.name} exited {done.returncode}:\n{code}\n{done.stdout}\n{done.stderr}"
    problems = unmatched(block.expected, done.stdout)
    assert not problems, f"{block.name}: {problems}\n{code}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout + done.stderr


async def _purchase_totals(url: str) -> tuple[object, object]:
    """The live rollup's purchases and the backfilled rollup, read in one snapshot."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            live = await conn.fetchrow(
                "SELECT sum(count), sum(sum_properties_amount) FROM agg_events_by_type WHERE type = 'purchase'"
            )
            filled = await conn.fetchrow("SELECT sum(count), sum(sum_properties_amount) FROM agg_purchases_by_country")
    finally:
        await conn.close()
    return tuple(live), tuple(filled)


def test_readme_commands_run_as_written(dev_stack: DevStack) -> None:
    blocks = shell_blocks((ROOT / "README.md").read_text())
    sections = {b.section for b in blocks}
    for needed in ("Two commands", "Authentication", "Adding, changing and removing a rollup", "Retention",
                   "Delivery guarantees", "Dead letters", "Operations"):
        assert needed in sections, f"README lost its {needed} example"
    ran: dict[str, str] = {}
    for block in blocks:
        output = _run(block, dev_stack)
        ran[block.name] = output
        assert "Traceback" not in output, f"{block.name} printed a traceback:\n{output}"
        if TALLY_COMMAND.search(block.code):  # found the stack through .tally/env, and said so
            assert "tally: using the `tally dev` stack (pid" in output, f"{block.name}:\n{output}"
    log = dev_stack.log()

    # The rollup walk-through: the consumer was fenced by the migrate and came back with the new
    # file, the query service too, and the backfilled past equals the live rollup's purchases.
    assert "consume exited with 3: its rollups file differs" in log, log[-3000:]
    assert "query stopped to load the new rollups" in log, log[-3000:]
    live, filled = asyncio.run(_purchase_totals(dev_stack.pg_url()))
    assert live == filled and live[0] is not None and live[0] > 0, (live, filled)

    # The kill -9 walk-through: the supervisor said so and restarted it; the count is exact.
    assert "consume was killed by signal 9; restarting it" in log, log[-3000:]
    kill_output = next(out for name, out in ran.items() if "kill_test" in out)
    assert kill_output.rstrip().endswith("}") and '"count":1000}' in kill_output.splitlines()[-1]

    # Through all of it ingest and query kept serving, and the stack is still up.
    assert dev_stack.process.poll() is None, log[-3000:]
    assert "stopping the stack" not in log


def _children(pid: int) -> dict[str, int]:
    """`tally dev`'s children by command (ingest, query, consume)."""
    found = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"core.cli" in argv:
            found[argv[argv.index(b"core.cli") + 1].decode()] = int(child)
    return found


@pytest.mark.parametrize("command", ["ingest", "query"])
def test_a_killed_child_comes_back_and_the_rest_keep_serving(dev_stack: DevStack, command: str) -> None:
    before = _children(dev_stack.process.pid)
    assert sorted(before) == ["consume", "ingest", "query"]
    os.kill(before[command], signal.SIGKILL)
    port = dev_stack.ports[{"ingest": 8000, "query": 8001}[command]]
    deadline = time.monotonic() + 60
    while (now := _children(dev_stack.process.pid)).get(command) in (None, before[command]) or not _ready(port):
        assert time.monotonic() < deadline, dev_stack.log()[-3000:]
        time.sleep(0.2)
    assert {k: v for k, v in now.items() if k != command} == {k: v for k, v in before.items() if k != command}
    assert f"{command} was killed by signal 9; restarting it (pid {before[command]})" in dev_stack.log()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_ctrl_c_stops_everything_and_removes_the_env_file(dev_stack: DevStack) -> None:
    """Runs after the walk-through (same module): Ctrl-C ends `tally dev` and every child."""
    dev_stack.process.send_signal(signal.SIGINT)
    assert dev_stack.process.wait(60) == 0, dev_stack.log()[-3000:]
    assert not devenv.path(dev_stack.cwd / ".tally").exists()
    for port in (dev_stack.ports[8000], dev_stack.ports[8001], dev_stack.ports[9101]):
        assert not devstack.port_open(port), f"something still listens on {port}"
