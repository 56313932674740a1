"""Structured logs: one JSON object per line, carrying the request id of the work at hand.

The request id comes from `X-Request-Id` (or is made up) in the HTTP middleware, is
kept in a context variable for everything that request logs, travels to Kafka in
the `tally-request-id` record header, and is logged again by the consumer when it
dead-letters what that request sent. So one grep follows a batch through every
process. `TALLY_LOG_FORMAT=text` gives plain lines for a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import orjson

request_id: ContextVar[str | None] = ContextVar("tally_request_id", default=None)

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            out["request_id"] = current
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure(service: str, *, level: str, fmt: str) -> None:
    """Replace the root handlers (uvicorn's loggers propagate to it: one format for all)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(logging.NOTSET)  # the root's level, not one uvicorn set before the app loaded
    # No access lines: one per request costs ~130 µs of JSON logging at ingest rates, and the
    # metrics count requests. uvicorn's httptools protocol logs them whenever
    # `uvicorn.access.hasHandlers()`, which propagating to the root would make true.
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the demo's requests are not news


@contextlib.contextmanager
def bound(value: str | None) -> Iterator[None]:
    """Log with this request id within the block."""
    token = request_id.set(value)
    try:
        yield
    finally:
        request_id.reset(token)
