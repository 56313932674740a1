"""How ingest and query are served: uvicorn or Granian (TALLY_SERVER, `--server`), the same app either way.

Both load the app in each worker process, run it on uvloop, write no access lines (the metrics
count requests) and serve TLS when TALLY_TLS_CERT_FILE and TALLY_TLS_KEY_FILE are set. Where
the servers differ (README, Servers):

- HTTP/2: Granian speaks HTTP/1.1 and HTTP/2 on one port (h2c with prior knowledge on plain
  TCP, `h2` chosen by ALPN under TLS); uvicorn speaks HTTP/1.1 only.
- Processes: uvicorn serves from the process itself with one worker, from N children of a
  supervisor with more; Granian always runs a supervisor and N worker processes, each doing
  its I/O on a Rust (tokio) runtime beside the Python event loop.
- SIGTERM: core.http.drain_on_sigterm delays either server's stop by TALLY_DRAIN_SECONDS.
  Granian has no deadline for requests in flight once stopping: its supervisor kills a worker
  still alive `kill_seconds` after the SIGTERM (no lifespan flush then; nothing it had answered
  202 is lost, a 202 comes only after Kafka's acknowledgement).
- The `Server` header: uvicorn's is turned off; Granian always sends `server: granian`.
- A supervisor killed outright (SIGKILL): uvicorn's workers end with it; Granian's would go on
  serving, orphaned, so each asks the kernel for a SIGINT when its supervisor dies.

Nothing here imports core.metrics or the apps: `tally` prepares PROMETHEUS_MULTIPROC_DIR first,
and each worker imports its app itself.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import signal
from functools import partial
from typing import Any, get_args

from core.settings import Server, Settings

SERVERS: tuple[Server, ...] = get_args(Server)
DEFAULT_SERVER: Server = Settings.model_fields["server"].default
LIFESPAN_SECONDS = 10.0  # what a Granian worker's lifespan gets to flush and close after its requests


def serve(app_path: str, settings: Settings, *, port: int, workers: int, factory: bool = True) -> None:
    """Serve the ASGI app at `app_path` ("module:attribute"; with `factory`, a function that builds
    it) on `settings.bind_host:port` with `settings.server`, until SIGTERM or SIGINT."""
    if settings.server == "granian":
        _granian(app_path, settings, port=port, workers=workers, factory=factory)
    else:
        _uvicorn(app_path, settings, port=port, workers=workers, factory=factory)


def _uvicorn(app_path: str, settings: Settings, *, port: int, workers: int, factory: bool) -> None:
    import uvicorn

    uvicorn.run(
        app_path,
        factory=factory,
        host=settings.bind_host,
        port=port,
        workers=workers,
        log_level=settings.log_level,
        log_config=None,  # the app factory configures logging (core.logs) in each worker
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_seconds)),
        access_log=False,  # per-request lines cost CPU at ingest rates; metrics count requests
        server_header=False,  # "Server: uvicorn" tells an attacker what to look up, and a client nothing
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
    )


def kill_seconds(settings: Settings) -> int:
    """How long Granian's supervisor waits for a worker to stop after SIGTERM before killing it:
    the drain, the grace for requests in flight, then the lifespan's flush."""
    total = settings.drain_seconds + settings.shutdown_grace_seconds + LIFESPAN_SECONDS
    return min(1800, math.ceil(total))  # Granian's own bound


def _granian(app_path: str, settings: Settings, *, port: int, workers: int, factory: bool) -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops, SSLProtocols
    from granian.log import LogLevels

    level = settings.log_level.lower()
    server = Granian(
        app_path,
        address=settings.bind_host,
        port=port,
        interface=Interfaces.ASGI,  # with lifespan: its state reaches every request's scope["state"]
        workers=workers,
        factory=factory,
        loop=Loops.uvloop,
        http=HTTPModes.auto,  # HTTP/1.1, and HTTP/2 by prior knowledge (h2c) or by ALPN under TLS
        websockets=False,  # Tally serves none
        log_level=LogLevels(level) if level in LogLevels.__members__ else LogLevels.info,
        log_dictconfig=_granian_logging(),
        log_access=False,
        ssl_cert=settings.tls_cert_file,
        ssl_key=settings.tls_key_file,
        ssl_protocol_min=SSLProtocols.tls12,  # as uvicorn (Python's ssl) accepts: the same clients reach both
        respawn_failed_workers=True,  # a worker that died (OOM) is replaced, as uvicorn's supervisor does
        workers_kill_timeout=kill_seconds(settings),
    )
    server.serve(target_loader=partial(_granian_worker_app, supervisor=os.getpid(), factory=factory))


def _granian_worker_app(target: str, *, supervisor: int, factory: bool) -> Any:
    """The app of one Granian worker, loaded in it once the kernel has been asked to send the
    worker SIGINT when its supervisor dies: Granian's stop without the drain (requests in flight
    finish, the lifespan flushes). Not SIGTERM: the kernel sends the signal again as each of the
    supervisor's threads exits, and a second SIGTERM cuts the drain short anyway."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    if os.getppid() != supervisor:  # it died before the request took effect
        raise SystemExit(f"granian's supervisor (pid {supervisor}) is gone")
    module, _, name = target.partition(":")
    app = getattr(importlib.import_module(module), name)
    return app() if factory else app


def _granian_logging() -> dict[str, Any]:
    """Granian's loggers without handlers of their own: its lines reach the root handler that
    core.logs set (JSON by default), like every other line of the process. A new dict each time:
    Granian writes the level into it."""
    return {
        "loggers": {
            "_granian": {"handlers": [], "propagate": True},
            "granian.access": {"handlers": [], "propagate": False},  # access lines are off anyway
        }
    }
