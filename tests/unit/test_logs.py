"""JSON log lines: fixed fields, the bound request id, `extra=` fields and exceptions."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from core import logs


def line(record: logging.LogRecord) -> dict[str, object]:
    parsed: dict[str, object] = json.loads(logs.JsonFormatter("consumer").format(record))
    return parsed


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("consumers.dlq", logging.WARNING, __file__, 1, msg, args, None)
    made.__dict__.update(extra)
    made.created, made.msecs = 1_764_000_000.25, 250.0
    return made


def test_fields_request_id_and_extras() -> None:
    with logs.bound("req-7"):
        out = line(record("dead-lettered %d record(s): %s", 3, "bad", reason="undecodable", records=3))
    assert out == {
        "ts": "2025-11-24T16:00:00.250Z", "level": "warning", "service": "consumer", "logger": "consumers.dlq",
        "msg": "dead-lettered 3 record(s): bad", "request_id": "req-7", "reason": "undecodable", "records": 3,
    }
    assert "request_id" not in line(record("no request here"))  # unbound outside the block


def test_exceptions_are_one_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        made = record("failed")
        made.exc_info = sys.exc_info()
    out = line(made)
    assert out["msg"] == "failed" and str(out["exc"]).startswith("Traceback") and "ValueError: boom" in str(out["exc"])


def test_configure_sends_every_logger_through_one_json_handler(capsys: pytest.CaptureFixture[str]) -> None:
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # as an earlier uvicorn.Config leaves it
    try:
        logs.configure("ingest", level="info", fmt="json")
        logging.getLogger("uvicorn.error").info("started")
        logging.getLogger("tally.x").debug("hidden at info")
        access_logged = logging.getLogger("uvicorn.access").hasHandlers()  # what uvicorn asks per connection
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            lg.handlers[:], lg.propagate = handlers, propagate
            lg.setLevel(level)
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert [(x["service"], x["logger"], x["msg"]) for x in lines] == [("ingest", "uvicorn.error", "started")]
    assert access_logged is False  # no line per request (the soak found one per request before)
