"""The opt-in on-disk spool (SQLite): a batch is written before its first attempt and removed
once the server answered it for good, so batches a crash, a close or a long outage left undelivered
are re-sent at the next start with their own keys and bytes."""

from __future__ import annotations

import sqlite3
import threading
import time

from tally_client._batching import Batch

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    written_at REAL NOT NULL,
    sent_at INTEGER NOT NULL,
    gzipped INTEGER NOT NULL,
    body BLOB NOT NULL,
    events BLOB NOT NULL
)
"""


class Spool:
    """Thread-safe (one connection behind a lock). Events are stored newline-joined: compact JSON
    holds no raw newline."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a written batch survives a power cut
        self._db.execute(_SCHEMA)

    def put(self, batch: Batch) -> None:
        """Store a sealed batch (again: a no-op)."""
        if batch.sent_at_ms is None:
            raise ValueError("seal the batch before spooling it")
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO batches (key, written_at, sent_at, gzipped, body, events) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (batch.key, time.time(), batch.sent_at_ms, int(batch.gzipped), batch.body, b"\n".join(batch.events)),
            )

    def remove(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM batches WHERE key = ?", (key,))

    def load(self) -> list[Batch]:
        """Every stored batch, oldest first, sealed as it was first sent."""
        with self._lock:
            rows = self._db.execute("SELECT key, sent_at, gzipped, body, events FROM batches ORDER BY seq").fetchall()
        return [
            Batch(events=bytes(events).split(b"\n"), key=key, body=bytes(body), gzipped=bool(gz), sent_at_ms=sent_at)
            for key, sent_at, gz, body, events in rows
        ]

    def __len__(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT count(*) FROM batches").fetchone()
        return int(n)

    def close(self) -> None:
        with self._lock:
            self._db.close()
