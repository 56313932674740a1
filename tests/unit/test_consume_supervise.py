"""`tally consume --processes N`'s decisions (consumers.supervise) without processes: what a child's
exit means, the supervisor's exit status, each child's port and environment, the backoff."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from consumers.supervise import (
    SuperviseError,
    after_exit,
    child_env,
    exit_status,
    metrics_ports,
    stopped_cleanly,
    supervise,
)
from core.cli import _parser
from core.restart import Child, RestartPolicy
from core.settings import Settings

TERM, INT, KILL = signal.SIGTERM, signal.SIGINT, signal.SIGKILL


def test_only_a_stale_rollups_file_stops_the_group_every_other_exit_restarts() -> None:
    assert after_exit(3) == "stale"
    assert [after_exit(code) for code in (0, 1, 2, 4, 130, -KILL, -TERM)] == ["restart"] * 7


@pytest.mark.parametrize(
    ("codes", "signals", "status"),
    [
        ([0, 0], [TERM], 0),  # both drained
        ([0, 0, 0], [INT], 0),
        ([0, -TERM], [TERM], 0),  # one was still starting: nothing in flight
        ([130, 0], [INT], 0),  # SIGINT before its handler: KeyboardInterrupt
        ([130, 0], [TERM], 130),
        ([0, -KILL], [TERM], 1),  # killed after the grace: not a clean stop
        ([0, 4], [TERM], 4),  # it said why: Kafka or Postgres unavailable
        ([3, 0], [TERM], 3),  # a stale rollups file wins over everything
        ([3, -KILL, 4], [TERM], 3),
        ([], [TERM], 0),
        ([0, -INT], [TERM, INT], 0),  # a second Ctrl-C
    ],
)
def test_the_supervisors_exit_status(codes: list[int], signals: list[int], status: int) -> None:
    assert exit_status(codes, signals) == status


def test_a_child_that_ended_by_another_signal_than_the_one_sent_did_not_stop_cleanly() -> None:
    assert stopped_cleanly(-TERM, [TERM])
    assert not stopped_cleanly(-signal.SIGSEGV, [TERM])
    assert not stopped_cleanly(130, [TERM])


def test_each_child_has_its_own_metrics_port_and_no_shared_metrics_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings = Settings(env="test", consumer_metrics_port=9101, kafka_bootstrap="k:9092", topic="t")
    assert metrics_ports(settings, 3) == [9101, 9102, 9103]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setenv("TALLY_CONSUMER_METRICS_PORT", "9101")
    env = child_env(settings, 9102)
    assert env["TALLY_CONSUMER_METRICS_PORT"] == "9102"
    assert env["TALLY_KAFKA_BOOTSTRAP"] == "k:9092" and env["TALLY_TOPIC"] == "t"
    assert "PROMETHEUS_MULTIPROC_DIR" not in env
    with pytest.raises(SuperviseError, match=r"65535\.\.65536"):
        metrics_ports(settings.model_copy(update={"consumer_metrics_port": 65535}), 2)


def test_a_taken_port_fails_the_command_before_any_child_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(
            env="test", kafka_bootstrap="k:9092", postgres_url="postgresql://x@h/db", consumer_metrics_port=port - 1
        )
        with pytest.raises(SuperviseError, match=rf"127\.0\.0\.1:{port} \(TALLY_CONSUMER_METRICS_PORT \+ 1\)"):
            supervise(settings, 2, ["false"])


def test_the_flag_defaults_to_one_process_and_refuses_fewer() -> None:
    assert _parser().parse_args(["consume"]).processes == 1
    assert _parser().parse_args(["consume", "--processes", "4"]).processes == 4
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["consume", "--processes", "0"])
    assert exc.value.code == 2


def test_restart_backoff_counts_failures_until_a_child_has_run_long_enough() -> None:
    policy = RestartPolicy(first=0.5, longest=4.0, healthy=30.0)
    process: Any = subprocess.Popen  # never called: the record only holds it
    child = Child("consumer 1", process, started=100.0)
    assert child.schedule_restart(policy, 101.0) == 0.5 and child.restart_at == 101.5
    child.started = 102.0
    assert child.schedule_restart(policy, 103.0) == 1.0
    child.started = 104.0
    assert child.schedule_restart(policy, 105.0) == 2.0 and child.failures == 3
    child.started = 110.0
    assert child.schedule_restart(policy, 140.0) == 0.5 and child.failures == 1  # it ran 30 s: healthy
