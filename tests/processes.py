"""Tally's own processes, started the way an operator starts them (`tally <command>`)."""

from __future__ import annotations

import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from core import devstack
from core.settings import Settings


@dataclass
class TallyProcess:
    command: str
    settings: Settings
    port: int
    log_path: Path
    args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self, timeout: float = 60.0) -> TallyProcess:
        env = self.settings.process_env()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "core.cli", self.command, *self.args],
                env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=devstack._die_with_parent,
            )
        devstack.wait_for_port(self.port, timeout, self.process)
        # Listening is not ready: ingest connects to Kafka in the background. (A consumer is ready
        # only once it has joined its group, which tests that kill consumers must not wait for.)
        deadline = time.monotonic() + timeout
        while self.command != "consume" and not self._ready():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"{self.command} never became ready; log:\n{self.log()[-2000:]}")
            time.sleep(0.05)
        return self

    @property
    def url(self) -> str:
        return f"{'https' if self.settings.tls_cert_file else 'http'}://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        cert = self.settings.tls_cert_file  # a test's self-signed certificate is its own authority
        context = ssl.create_default_context(cafile=str(cert)) if cert else None
        try:
            readyz = f"{self.url}/readyz"  # http or https, built here
            with urllib.request.urlopen(readyz, timeout=2, context=context) as response:  # noqa: S310
                return bool(response.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no chance to finish a batch or leave the group."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path. Returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def tally_process(command: str, settings: Settings, tmp: Path, *args: str) -> TallyProcess:
    """A process on fresh ports, so several can run side by side."""
    port = devstack.free_port()
    field_name = {"ingest": "ingest_port", "query": "query_port", "consume": "consumer_metrics_port"}[command]
    own = settings.model_copy(update={field_name: port})
    return TallyProcess(command, own, port, tmp / f"{command}-{port}-{int(time.time() * 1000)}.log", args)
