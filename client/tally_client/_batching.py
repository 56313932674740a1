"""Cutting the queue into batches and encoding a batch's body. Pure: no I/O, the caller passes
the time."""

from __future__ import annotations

import gzip
import uuid
from dataclasses import dataclass, field

# `{"sent_at":<13 digits>,"events":[` + `]}`: what a body adds to its events' bytes and commas.
BODY_OVERHEAD = len(b'{"sent_at":0000000000000,"events":[]}') + 8


@dataclass(slots=True)
class Batch:
    """Events that travel together, under one Idempotency-Key for every attempt."""

    events: list[bytes]
    key: str = field(default_factory=lambda: str(uuid.uuid4()))
    body: bytes = b""  # fixed at the first attempt: a retry must send the very same bytes
    gzipped: bool = False
    sent_at_ms: int | None = None
    attempts: int = 0

    def __len__(self) -> int:
        return len(self.events)

    def seal(self, sent_at_ms: int, gzip_min_bytes: int) -> None:
        """Encode the body once, with `sent_at`; later calls keep it (same key, same bytes)."""
        if self.sent_at_ms is not None:
            return
        self.sent_at_ms = sent_at_ms
        self.body, self.gzipped = encode_body(self.events, sent_at_ms, gzip_min_bytes)


def encode_body(events: list[bytes], sent_at_ms: int, gzip_min_bytes: int) -> tuple[bytes, bool]:
    """`{"sent_at": <epoch ms>, "events": [...]}`, gzipped (deterministically: mtime 0) when larger
    than `gzip_min_bytes`. Returns the bytes and whether they are gzipped."""
    raw = b'{"sent_at":%d,"events":[%b]}' % (sent_at_ms, b",".join(events))
    if len(raw) > gzip_min_bytes:
        return gzip.compress(raw, compresslevel=6, mtime=0), True
    return raw, False


class Batcher:
    """Accumulates encoded events; says when a batch is due (count, bytes or age)."""

    def __init__(self, *, max_events: int, max_bytes: int, max_age: float) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._events: list[bytes] = []
        self._bytes = BODY_OVERHEAD
        self._since: float | None = None

    def __len__(self) -> int:
        return len(self._events)

    def add(self, event: bytes, now: float) -> list[Batch]:
        """Take one event; return the batches it closes (none, one, or two).

        An event that would push the body past `max_bytes` closes the batch before it (and starts
        the next one); reaching `max_events` closes the batch with it.
        """
        closed: list[Batch] = []
        if self._events and self._bytes + len(event) + 1 > self.max_bytes:
            closed.append(self._cut())
        if not self._events:
            self._since = now
        self._events.append(event)
        self._bytes += len(event) + 1
        if len(self._events) >= self.max_events:
            closed.append(self._cut())
        return closed

    def due_at(self) -> float | None:
        """When the open batch becomes due by age (None when empty)."""
        return None if self._since is None else self._since + self.max_age

    def due(self, now: float) -> Batch | None:
        """The open batch if it is old enough."""
        at = self.due_at()
        return self.take() if at is not None and now >= at else None

    def take(self) -> Batch | None:
        """The open batch now, whatever its age (a flush); None when empty."""
        return self._cut() if self._events else None

    def _cut(self) -> Batch:
        batch = Batch(self._events)
        self._events, self._bytes, self._since = [], BODY_OVERHEAD, None
        return batch
