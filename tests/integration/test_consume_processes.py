"""`tally consume --processes 2` as an operator runs it, against real Kafka-protocol and Postgres
servers: two children in one group share the partitions and count exactly; SIGTERM drains both and
the supervisor exits 0 leaving no process behind; a child killed with SIGKILL is restarted and the
counts stay exact; a stale rollups file stops the group with exit status 3; killing the supervisor
stops the children."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core import devstack
from core.settings import Settings
from tests.integration.consumer_helpers import (
    assert_tables_match,
    envelopes,
    make_events,
    produce,
    spread,
    stored_offsets,
    wait_for_offsets,
)

pytestmark = pytest.mark.integration
PARTITIONS = 4  # the `settings` fixture's topic_partitions: more than the processes


def _two_free_ports() -> int:
    """A port p with p + 1 free too: the children's metrics ports. Taken below the ephemeral range,
    where no client connection of this or another test (Postgres, Kafka) can be holding p + 1."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(max(1024, low - 12_000), low - 1, 2)
        try:
            with socket.socket() as a, socket.socket() as b:
                for sock, number in ((a, port), (b, port + 1)):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.bind(("127.0.0.1", number))
        except OSError:
            continue
        return port
    raise RuntimeError("no two adjacent free ports")


def children_of(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is `pid`, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextmanager
def supervisor(settings: Settings, log: Path, processes: int = 2) -> Iterator[subprocess.Popen[bytes]]:
    """`tally consume --processes N`; killed with its children if the test fails before it stops it."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "core.cli", "consume", "--processes", str(processes)],
            env=settings.process_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=devstack._die_with_parent,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            kids = children_of(proc.pid)
            proc.kill()  # its children get SIGTERM (PR_SET_PDEATHSIG) and drain
            proc.wait()
            deadline = time.monotonic() + 30
            while any(alive(k) for k in kids) and time.monotonic() < deadline:
                time.sleep(0.05)
            for kid in kids:
                if alive(kid):
                    os.kill(kid, signal.SIGKILL)


async def wait_for_children(proc: subprocess.Popen[bytes], count: int, log: Path, timeout: float = 30) -> set[int]:
    deadline = time.monotonic() + timeout
    while len(kids := children_of(proc.pid)) != count:
        assert proc.poll() is None, f"supervisor exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"children {kids}, not {count}:\n{log.read_text()[-3000:]}"
        await asyncio.sleep(0.05)
    return kids


async def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A child's /metrics as {sample name: [(labels, value)]}; {} while it does not answer."""
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    except httpx.HTTPError:
        return {}
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


async def owned(settings: Settings, port: int) -> set[int]:
    """The partitions a child reports lag for: those it holds (a revoked one's series is dropped)."""
    samples = (await scrape(port)).get("tally_consumer_lag_records", [])
    return {int(labels["partition"]) for labels, _ in samples if labels["topic"] == settings.topic}


async def wait_for_split(settings: Settings, ports: list[int], log: Path, timeout: float = 45) -> list[set[int]]:
    """Until every child holds partitions and together they hold each partition once: both joined."""
    deadline = time.monotonic() + timeout
    while True:
        held = [await owned(settings, port) for port in ports]
        together = [p for h in held for p in h]
        if all(held) and sorted(together) == list(range(PARTITIONS)):
            return held
        assert time.monotonic() < deadline, f"partitions held {held}:\n{log.read_text()[-3000:]}"
        await asyncio.sleep(0.1)


async def applied(port: int) -> float:
    return sum(value for _, value in (await scrape(port)).get("tally_consumer_events_applied_total", []))


def stop(proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        tail = log.read_text()[-3000:]
        raise AssertionError(f"supervisor still running {timeout} s after SIGTERM:\n{tail}") from None


def config(migrated: Settings) -> Settings:
    # Tansu ignores LeaveGroup: a member's partitions move when its session expires; keep that short.
    return migrated.model_copy(
        update={
            "consumer_metrics_port": _two_free_ports(),
            "session_timeout_ms": 3_000,
            "heartbeat_interval_ms": 300,
            "batch_max_records": 3,
            "shutdown_grace_seconds": 20.0,
        }
    )


async def test_two_processes_share_the_partitions_count_exactly_and_stop_on_sigterm(
    migrated: Settings, tmp_path: Path
) -> None:
    settings = config(migrated)
    ports = [settings.consumer_metrics_port, settings.consumer_metrics_port + 1]
    log = tmp_path / "consume.log"
    with supervisor(settings, log) as proc:
        kids = await wait_for_children(proc, 2, log)
        held = await wait_for_split(settings, ports, log)

        events = make_events(600, random.Random(11))
        ends = await produce(settings, spread(envelopes(events, 5), PARTITIONS))
        await wait_for_offsets(settings, ends, timeout=45)
        await assert_tables_match(settings, [orjson.loads(e) for e in events])
        # Each child applied the events of its own partitions, and no event was applied twice.
        counts = [await applied(port) for port in ports]
        assert all(counts) and sum(counts) == len(events), (held, counts)
        assert children_of(proc.pid) == kids  # nobody died and was replaced meanwhile

        assert stop(proc, log) == 0, log.read_text()[-3000:]
    assert not [k for k in kids if alive(k)]
    assert await stored_offsets(settings) == ends
    text = log.read_text()
    assert text.count("consumer stopped") == 2, text[-3000:]  # each child drained and said so
    assert "exit status 0" in text


async def test_a_child_killed_with_sigkill_is_restarted_and_counts_stay_exact(
    migrated: Settings, tmp_path: Path
) -> None:
    settings = config(migrated)
    ports = [settings.consumer_metrics_port, settings.consumer_metrics_port + 1]
    log = tmp_path / "consume.log"
    rng = random.Random(12)
    with supervisor(settings, log) as proc:
        kids = await wait_for_children(proc, 2, log)
        await wait_for_split(settings, ports, log)

        first = make_events(1200, rng)
        ends = await produce(settings, spread(envelopes(first, 2), PARTITIONS))
        total, deadline = sum(ends.values()), time.monotonic() + 30
        while sum((await stored_offsets(settings)).values()) < total // 4:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            await asyncio.sleep(0.01)
        victim = max(kids)
        os.kill(victim, signal.SIGKILL)  # mid-stream: no chance to finish its batch or leave the group

        deadline = time.monotonic() + 20
        while len(now := children_of(proc.pid)) != 2 or victim in now:
            assert time.monotonic() < deadline, f"not restarted: {now}:\n{log.read_text()[-3000:]}"
            await asyncio.sleep(0.05)
        assert len(now & kids) == 1  # the survivor, and a new process beside it
        await wait_for_split(settings, ports, log)  # the new child joined and holds partitions

        second = make_events(200, rng)  # work for the group as it is now
        more = await produce(settings, spread(envelopes(second, 2), PARTITIONS))
        await wait_for_offsets(settings, more, timeout=45)
        await assert_tables_match(settings, [orjson.loads(e) for e in first + second])
        assert stop(proc, log) == 0, log.read_text()[-3000:]
    assert not [k for k in now if alive(k)]
    assert f"(pid {victim}) was killed by signal 9; restarting it" in log.read_text()


async def test_a_stale_rollups_file_stops_every_child_and_the_supervisor_exits_3(
    migrated: Settings, tmp_path: Path
) -> None:
    """Children whose rollups file lacks a registered rollup exit 3: restarting cannot help."""
    shipped = migrated.rollups_file.read_text()
    stale = tmp_path / "rollups.toml"
    stale.write_text(shipped[: shipped.index('name = "page_views"')].rpartition("[[rollup]]")[0])
    settings = config(migrated).model_copy(update={"rollups_file": stale})
    log = tmp_path / "consume.log"
    with supervisor(settings, log) as proc:
        kids = await wait_for_children(proc, 2, log)
        try:
            code = await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running:\n{log.read_text()[-3000:]}") from None
    assert code == 3, log.read_text()[-3000:]
    assert not [k for k in kids if alive(k)]
    text = log.read_text()
    assert "restarting it" not in text and "it lacks page_views" in text, text[-3000:]


async def test_the_children_stop_when_the_supervisor_is_killed(migrated: Settings, tmp_path: Path) -> None:
    """SIGKILL gives the supervisor no chance to forward anything: PR_SET_PDEATHSIG stops the children."""
    settings = config(migrated)
    log = tmp_path / "consume.log"
    with supervisor(settings, log) as proc:
        kids = await wait_for_children(proc, 2, log)
        await wait_for_split(settings, [settings.consumer_metrics_port, settings.consumer_metrics_port + 1], log)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while [k for k in kids if alive(k)]:
            assert time.monotonic() < deadline, f"still running: {kids}:\n{log.read_text()[-3000:]}"
            await asyncio.sleep(0.05)
    assert log.read_text().count("consumer stopped") == 2  # each drained on its SIGTERM
