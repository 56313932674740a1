"""`.tally/env` (core.devenv) and the dev supervisor's restart policy (core.devrun): pure parts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from core import devenv
from core.devrun import RestartPolicy, exit_reason

VALUES = {
    "kafka_bootstrap": "127.0.0.1:19092",
    "postgres_url": "postgresql://postgres@127.0.0.1:15432/postgres",
    "redis_url": "redis://127.0.0.1:16379/0",
    "rollups_file": "/srv/my rollups/rollups.toml",  # a space survives the shell quoting
}


def test_render_parse_round_trip() -> None:
    env = devenv.DevEnv(4242, VALUES)
    assert devenv.parse(env.render()) == env


def test_rendered_file_is_sourceable_by_a_shell(tmp_path: Path) -> None:
    devenv.write(tmp_path, devenv.DevEnv(4242, VALUES))
    out = subprocess.run(
        ["bash", "-c", f'source {tmp_path / "env"} && printf "%s|" "$TALLY_ROLLUPS_FILE" "$TALLY_POSTGRES_URL"'],
        capture_output=True, text=True, check=True,
    ).stdout
    assert out == f"{VALUES['rollups_file']}|{VALUES['postgres_url']}|"


def test_parse_refuses_other_text() -> None:
    assert devenv.parse("") is None
    assert devenv.parse("export TALLY_POSTGRES_URL=x\n") is None  # no pid: not written by tally dev
    assert devenv.parse("# pid 12\nexport TALLY_SECRET=x\n") is None  # nothing it shares


def test_discover_reads_a_running_dev_and_lets_the_environment_win(tmp_path: Path) -> None:
    devenv.write(tmp_path, devenv.DevEnv(os.getpid(), VALUES))
    found, env = devenv.discover({"TALLY_DEV_DIR": str(tmp_path), "TALLY_ROLLUPS_FILE": "mine.toml"})
    assert env is not None and env.pid == os.getpid()
    assert found == {k: v for k, v in VALUES.items() if k != "rollups_file"}
    # Any server URL in the environment: the file is not read at all.
    assert devenv.discover({"TALLY_DEV_DIR": str(tmp_path), "TALLY_REDIS_URL": "redis://elsewhere"}) == ({}, None)


def test_discover_ignores_the_file_of_a_dev_that_is_gone(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    devenv.write(tmp_path, devenv.DevEnv(int(gone.stdout), VALUES))
    assert devenv.discover({"TALLY_DEV_DIR": str(tmp_path)}) == ({}, None)


def test_remove_only_removes_its_own_file(tmp_path: Path) -> None:
    devenv.write(tmp_path, devenv.DevEnv(1111, VALUES))
    devenv.remove(tmp_path, 2222)  # a later `tally dev` wrote it: keep
    assert devenv.path(tmp_path).exists()
    devenv.remove(tmp_path, 1111)
    assert not devenv.path(tmp_path).exists()


def test_restart_backoff_doubles_to_its_cap() -> None:
    policy = RestartPolicy(first=0.5, longest=4.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_exit_reasons_say_what_happened() -> None:
    assert exit_reason("consume", -9) == "consume was killed by signal 9; restarting it"
    assert exit_reason("ingest", 1) == "ingest exited with 1; restarting it"
    assert exit_reason("consume", 3).startswith(
        "consume exited with 3: its rollups file differs from the one `tally migrate` registered; "
        "restarting query and consume"
    )
