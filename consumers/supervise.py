"""`tally consume --processes N`: N consumers of one group under one supervisor process.

Why processes: a consumer decodes and pre-aggregates its batches in Python, on one
core; more cores need more processes. Kafka's group protocol spreads the topic's
partitions over the N children exactly as over N separate `tally consume`, and each
child keeps the exactly-once effect by itself (DESIGN §5: the conditional offset
update), so the supervisor holds nothing that counts. It starts, signals and
restarts processes, and that is all.

The choices, and why:

- Each child is `tally consume` itself, a fresh interpreter started with `subprocess`
  from the command line the caller gives (core.cli, the composition root, names it;
  this module does not). It has the same settings, logging, one-line errors and exit
  statuses as a single consumer, and inherits nothing from the supervisor but its
  environment. multiprocessing's "spawn" would start a fresh interpreter too, but adds
  its resource-tracker process, pickles the settings, and reports a failed child as a
  traceback and status 1 instead of the statuses in README's table.
- One metrics port per child: child i serves /metrics, /healthz and /readyz on
  TALLY_CONSUMER_METRICS_PORT + i, one Prometheus target each. A probe of a single
  port could not speak for N processes, and one port in prometheus_client's
  multiprocess mode would be wrong: a partition's lag gauge is dropped by the child
  that loses the partition, but a merged gauge would keep a dead or former owner's
  value. With its own port, a restarted child's counters start from zero like those
  of any restarted target, which `rate()` handles. PROMETHEUS_MULTIPROC_DIR is taken
  out of the children's environment, so no child reports the others' counts.
- Signals: SIGTERM and SIGINT are forwarded to every child, which drains as a single
  consumer does (finishes and commits its batch in flight, leaves). The supervisor
  waits up to TALLY_SHUTDOWN_GRACE_SECONDS for them, then kills what is left: a killed
  child's uncommitted batch is applied by the partition's next owner, so nothing is
  lost or counted twice. Every child gets PR_SET_PDEATHSIG (core.devstack), so killing
  the supervisor with SIGKILL still stops its children; since that signal follows the
  thread that started the child, the supervisor has one thread and no event loop.
- Exits: a child that exits 3 (its rollups file differs from the registered one,
  consumers.main.serve) stops the others and the supervisor exits 3, as one consumer
  would: every child reads the same file, so restarting cannot help. Any other exit (a
  crash, a kill -9, Kafka or Postgres gone at start) is restarted with core.restart's
  backoff, the same as under `tally dev`.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from types import FrameType
from typing import Literal

from core.devstack import _die_with_parent
from core.restart import Child, RestartPolicy, how_it_ended
from core.settings import Settings

log = logging.getLogger(__name__)
STALE_ROLLUPS = 3  # consumers.main.serve: this rollups file is not the one `tally migrate` registered
EXIT_FAILED = 1  # README's exit statuses: a child that did not stop cleanly when asked
EXIT_INTERRUPTED = 130  # core.cli: a child that got SIGINT before it could handle it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_SECONDS = 0.1


class SuperviseError(Exception):
    """The consumers cannot be started as asked (core.cli prints it, exit status 1)."""


def after_exit(code: int) -> Literal["restart", "stale"]:
    """What to do about a child that exited while nobody asked it to stop."""
    return "stale" if code == STALE_ROLLUPS else "restart"


def stopped_cleanly(code: int, signals: Iterable[int]) -> bool:
    """Whether a child that was asked to stop with `signals` did. It drains and exits 0; a child
    still starting, before it handles signals, dies of the signal (or exits 130 after SIGINT),
    which is clean too: it had nothing in flight."""
    sent = set(signals)
    return code == 0 or -code in sent or (code == EXIT_INTERRUPTED and signal.SIGINT in sent)


def exit_status(codes: Iterable[int], signals: Iterable[int]) -> int:
    """The supervisor's exit status from its children's last ones, after it stopped them with
    `signals`: 3 if any said its rollups file is stale, 0 if all stopped cleanly, else the first
    failing child's status (1 when it was killed)."""
    codes, sent = list(codes), set(signals)
    if STALE_ROLLUPS in codes:
        return STALE_ROLLUPS
    failed = [code for code in codes if not stopped_cleanly(code, sent)]
    if not failed:
        return 0
    return next((code for code in failed if code > 0), EXIT_FAILED)


def metrics_ports(settings: Settings, processes: int) -> list[int]:
    """Child i's metrics port: TALLY_CONSUMER_METRICS_PORT + i."""
    ports = [settings.consumer_metrics_port + i for i in range(processes)]
    if ports[-1] > 65535:
        raise SuperviseError(
            f"{processes} processes need metrics ports {ports[0]}..{ports[-1]}: "
            "lower TALLY_CONSUMER_METRICS_PORT or --processes"
        )
    return ports


def child_env(settings: Settings, port: int) -> dict[str, str]:
    """A child's environment: these settings with its own metrics port, and no shared metrics
    directory (each child's /metrics shows its own counts)."""
    env = settings.model_copy(update={"consumer_metrics_port": port}).process_env()
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def _check_ports(host: str, ports: Sequence[int]) -> None:
    """Fail at once, naming the port, rather than restart a child that cannot bind for ever.
    The bind is the one a child makes (consumers.ops._listen), without importing its web server."""
    for i, port in enumerate(ports):
        try:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
        except OSError as exc:
            raise SuperviseError(
                f"metrics port {host}:{port} (TALLY_CONSUMER_METRICS_PORT + {i}) is not free ({exc.strerror}): "
                f"{len(ports)} processes use {ports[0]}..{ports[-1]}"
            ) from None


class Supervisor:
    """N children running `command` (`tally consume`), each on its own metrics port."""

    def __init__(self, settings: Settings, command: Sequence[str], ports: Sequence[int], policy: RestartPolicy) -> None:
        self.settings = settings
        self.command = list(command)
        self.ports = list(ports)
        self.policy = policy
        self.children: list[Child] = []
        self.received: list[int] = []  # signals, in order, appended by the handler
        self.forwarded: list[int] = []

    def _start(self, index: int) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and module, from core.cli
            self.command, env=child_env(self.settings, self.ports[index]), preexec_fn=_die_with_parent
        )
        log.info(
            "consumer %d of %d started (pid %d, metrics on %s:%d)",
            index + 1,
            len(self.ports),
            process.pid,
            self.settings.bind_host,
            self.ports[index],
        )
        return process

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def _forward(self) -> None:
        """Send every signal received since the last call to every running child."""
        for signum in self.received[len(self.forwarded) :]:
            self.forwarded.append(signum)
            running = [child for child in self.children if child.process.poll() is None]
            log.info("sending %s to %d running consumers", signal.Signals(signum).name, len(running))
            for child in running:
                child.process.send_signal(signum)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            for index in range(len(self.ports)):
                self.children.append(Child(f"consumer {index + 1}", self._start(index), time.monotonic()))
            if self._watch():  # a child's exit 3: the others are stopped as a SIGTERM would
                self.received.append(signal.SIGTERM)
            return self._drain()
        finally:
            for child in self.children:  # only reached by an error here: never leave one behind
                if child.process.poll() is None:
                    child.process.kill()
                    child.process.wait()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _watch(self) -> bool:
        """Keep every child running until a stop signal (False) or a child's exit 3 (True)."""
        while not self.received:
            now = time.monotonic()
            for index, child in enumerate(self.children):
                code = child.process.poll()
                if code is None:
                    continue
                if child.restart_at is None:  # it has just exited
                    if after_exit(code) == "stale":
                        log.error(
                            "%s (pid %d) exited with %d: its rollups file differs from the one `tally migrate` "
                            "registered; stopping the others (redeploy, do not just restart)",
                            child.name,
                            child.process.pid,
                            code,
                        )
                        return True
                    delay = child.schedule_restart(self.policy, now)
                    log.warning(
                        "%s (pid %d) %s; restarting it in %.1f s",
                        child.name,
                        child.process.pid,
                        how_it_ended(code),
                        delay,
                    )
                elif now >= child.restart_at:
                    child.process, child.started, child.restart_at = self._start(index), now, None
            time.sleep(POLL_SECONDS)
        return False

    def _drain(self) -> int:
        """Stop every child, wait for them (up to the grace), kill the rest; the exit status."""
        self._forward()
        running = [c for c in self.children if c.restart_at is None]  # not the dead awaiting a restart
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds
        while any(c.process.poll() is None for c in running):
            self._forward()  # a second Ctrl-C reaches them too
            if time.monotonic() >= deadline:
                for child in running:
                    if child.process.poll() is None:
                        log.error(
                            "%s (pid %d) still running %.0f s after it was told to stop; killing it "
                            "(the partition's next owner applies its batch in flight)",
                            child.name,
                            child.process.pid,
                            self.settings.shutdown_grace_seconds,
                        )
                        child.process.kill()
                        child.process.wait()
                break
            time.sleep(POLL_SECONDS)
        codes = [c.process.returncode for c in running]  # a stale child's 3 among them
        status = exit_status(codes, self.received)
        log.info("%d consumers stopped (%s); exit status %d", len(running), _summary(codes), status)
        return status


def _summary(codes: Iterable[int]) -> str:
    return ", ".join(how_it_ended(code) for code in codes)


def supervise(
    settings: Settings, processes: int, command: Sequence[str], *, policy: RestartPolicy | None = None
) -> int:
    """Run `processes` children of `command` (`tally consume`) until SIGTERM/SIGINT; the exit status.

    What every child would fail on is checked here first, once, so that it fails the command
    instead of sending N children into a restart loop: the servers are set, the rollups file
    reads, the metrics ports are free.
    """
    if processes < 1:
        raise SuperviseError(f"--processes must be at least 1, not {processes}")
    settings.require("kafka_bootstrap", "postgres_url")
    settings.rollups  # noqa: B018 - parsed for its errors
    ports = metrics_ports(settings, processes)
    _check_ports(settings.bind_host, ports)
    return Supervisor(settings, command, ports, policy or RestartPolicy()).run()
