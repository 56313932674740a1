"""What Client and AsyncClient share: the bounded queue, the counters, the batcher, and what an
answer does to a batch (counters, callbacks, logs). No network I/O here."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from tally_client._batching import Batch, Batcher
from tally_client._events import build_event, decode_events, now_ms
from tally_client._options import (
    ClientClosed,
    DroppedCallback,
    Options,
    QueueFull,
    RejectedCallback,
    Stats,
)
from tally_client._retry import Decision, Verdict, decide, parse_retry_after
from tally_client._spool import Spool
from tally_client._transport import Response

logger = logging.getLogger("tally_client")


class Core:
    def __init__(
        self,
        options: Options,
        on_rejected: RejectedCallback | None,
        on_dropped: DroppedCallback | None,
    ) -> None:
        self.options = options
        self.on_rejected = on_rejected
        self.on_dropped = on_dropped
        self.cv = threading.Condition(threading.Lock())
        self.queue: deque[bytes] = deque()
        self.batcher = Batcher(
            max_events=options.max_batch_events, max_bytes=options.max_batch_bytes, max_age=options.flush_interval
        )
        self.closed = False
        self.flushed_by_close = False  # close() flushed already: the exit hook need not again
        self.flushing = 0  # flush() calls waiting: the worker sends the open batch at once
        # Sequence numbers of queued events: `enqueued` taken, `finished` resolved (FIFO), so a
        # flush waits for exactly the events queued before it.
        self.enqueued = 0
        self.finished = 0
        self.captured = 0
        self.sent = 0
        self.retried = 0
        self.rejected = 0
        self.dropped = 0
        self.outstanding = 0  # captured, not resolved: what the bound applies to
        self.spooled = 0
        self._drops_logged = 0
        self.spool = Spool(options.spool_path) if options.spool_path else None
        # Batches a previous client left in the spool: sent first, with their keys and bytes.
        self.recovered = self.spool.load() if self.spool else []
        if self.recovered:
            n = sum(len(b) for b in self.recovered)
            self.captured = self.outstanding = self.enqueued = n
            logger.warning(
                "tally_client: %d events in %d batches recovered from the spool %s; re-sending them",
                n,
                len(self.recovered),
                options.spool_path,
            )

    # --- the capturing side ---

    def encode(
        self,
        type: str,
        source: str | None,
        user_id: str | None,
        session_id: str | None,
        properties: Mapping[str, Any] | None,
        ts: datetime | int | None,
        event_id: Any,
    ) -> bytes:
        return build_event(
            type,
            source=source,
            user_id=user_id,
            session_id=session_id,
            properties=properties,
            ts=ts,
            event_id=event_id,
            max_event_bytes=self.options.max_event_bytes,
        )

    def offer(self, event: bytes, *, wait: float) -> bool:
        """Queue one encoded event. Returns whether the worker should be woken. When full: waits up
        to `wait` s under "block" (then QueueFull), or drops it under "drop"."""
        options = self.options
        with self.cv:
            if self.closed:
                raise ClientClosed("capture() after close()")
            if self.outstanding >= options.max_queue_events and options.full_policy == "block":
                deadline = time.monotonic() + wait
                while self.outstanding >= options.max_queue_events and not self.closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise QueueFull(
                            f"the queue holds {self.outstanding} events (max_queue_events) "
                            f"and none left within {wait:g} s"
                        )
                    self.cv.wait(left)
                if self.closed:
                    raise ClientClosed("capture() after close()")
            if self.outstanding < options.max_queue_events:
                self.captured += 1
                self.outstanding += 1
                self.enqueued += 1
                self.queue.append(event)
                n = len(self.queue)
                wake = n == 1 or n >= options.max_batch_events
                if wake:
                    self.cv.notify_all()
                return wake
            self.captured += 1
            self.dropped += 1
            drops = self.dropped
            log = drops >= 2 * self._drops_logged
            if log:
                self._drops_logged = drops
        if log:  # the first drop, then at each doubling: loud without flooding the log
            logger.error(
                "tally_client: queue full (%d events, max_queue_events); dropping new events (%d dropped so far)",
                options.max_queue_events,
                drops,
            )
        self.call_dropped([event], "queue full (max_queue_events)")
        return False

    def stats(self) -> Stats:
        with self.cv:
            return Stats(
                captured=self.captured,
                sent=self.sent,
                retried=self.retried,
                rejected=self.rejected,
                dropped=self.dropped,
                queue_depth=self.outstanding,
                spooled=self.spooled,
            )

    # --- the delivery side (called by one worker) ---

    def next_batches(self, now: float) -> list[Batch]:
        """Move queued events into the batcher; the batches due now (full, old, or flushing)."""
        with self.cv:
            events = list(self.queue)
            self.queue.clear()
            force = self.flushing > 0 or self.closed
        out: list[Batch] = []
        add = self.batcher.add
        for event in events:
            out += add(event, now)
        last = self.batcher.take() if force else self.batcher.due(now)
        if last is not None:
            out.append(last)
        return out

    def idle(self) -> bool:
        """Nothing to do until woken or the open batch's age (the caller holds `cv`)."""
        return not self.queue and not (self.flushing and len(self.batcher))

    def wait_time(self, now: float) -> float | None:
        at = self.batcher.due_at()
        return None if at is None else max(0.0, at - now)

    def judge(self, batch: Batch, answer: Response | BaseException, first_at: float, now: float) -> Decision:
        """One attempt's outcome: counted and logged; the decision returned. Resolves the batch
        unless the decision is a retry the caller will make."""
        if isinstance(answer, BaseException):
            status, retry_after, what = None, None, f"network error: {answer.__class__.__name__}: {answer}"
        else:
            status, retry_after = answer.status, parse_retry_after(answer.retry_after)
            what = f"HTTP {answer.status}" + _detail(answer.body)
        decision = decide(
            status,
            retry_after,
            retries_done=batch.attempts - 1,
            first_attempt_at=first_at,
            now=now,
            options=self.options,
            what=what,
        )
        if decision.verdict is Verdict.RETRY:
            with self.cv:
                self.retried += 1
            logger.debug(
                "tally_client: batch %s (%d events) attempt %d: %s; retrying in %.2f s%s with the same key",
                batch.key,
                len(batch),
                batch.attempts,
                what,
                decision.delay,
                "" if retry_after is None else f" (Retry-After {retry_after:g} s)",
            )
        elif decision.verdict is Verdict.DELIVERED and isinstance(answer, Response):
            self._unspool(batch)
            self._delivered(batch, answer)
        elif decision.verdict is Verdict.REJECTED and isinstance(answer, Response):
            self._unspool(batch)
            self._rejected(batch, answer)
        elif decision.exhausted:
            self.give_up(batch, decision.reason)
        else:
            logger.debug("tally_client: batch %s attempt %d: %s; not retried", batch.key, batch.attempts, what)
            self._unspool(batch)
            self.drop(batch, decision.reason)
        return decision

    def prepare(self, batch: Batch) -> None:
        """Before the first attempt: fix the body (with sent_at) and spool it."""
        batch.seal(sent_at(), self.options.gzip_min_bytes)
        if self.spool is not None:
            self.spool.put(batch)

    def take_recovered(self) -> list[Batch]:
        out, self.recovered = self.recovered, []
        return out

    def _unspool(self, batch: Batch) -> None:
        if self.spool is not None:
            self.spool.remove(batch.key)

    def give_up(self, batch: Batch, reason: str) -> None:
        """Not delivered though the server may take it later (retries spent, closing): kept in the
        spool when there is one, dropped otherwise."""
        if self.spool is None:
            self.drop(batch, reason)
            return
        self.prepare(batch)  # a no-op for a batch already sent once
        self._resolve(batch, spooled=len(batch))
        logger.warning(
            "tally_client: batch %s (%d events) kept in the spool %s for the next start: %s",
            batch.key,
            len(batch),
            self.options.spool_path,
            reason,
        )

    def _delivered(self, batch: Batch, answer: Response) -> None:
        rejected: list[dict[str, Any]] = []
        try:
            doc = json.loads(answer.body)
            if isinstance(doc, dict) and isinstance(doc.get("rejected"), list):
                rejected = [r for r in doc["rejected"] if isinstance(r, dict)]
        except ValueError:
            logger.warning("tally_client: batch %s: HTTP %d with a body that is not JSON", batch.key, answer.status)
        logger.debug(
            "tally_client: batch %s (%d events) delivered: HTTP %d after %d attempt(s)",
            batch.key,
            len(batch),
            answer.status,
            batch.attempts,
        )
        if rejected:
            logger.warning(
                "tally_client: batch %s: the server rejected %d of %d events: %s",
                batch.key,
                len(rejected),
                len(batch),
                _summary(rejected),
            )
            self.call_rejected(batch, rejected)  # before the counters: a flush returns after its callbacks
        rejected_n = min(len(rejected), len(batch))
        self._resolve(batch, sent=len(batch) - rejected_n, rejected=rejected_n)

    def _rejected(self, batch: Batch, answer: Response) -> None:
        errors: list[dict[str, Any]] = []
        try:
            doc = json.loads(answer.body)
            if isinstance(doc, dict) and isinstance(doc.get("errors"), list):
                errors = [r for r in doc["errors"] if isinstance(r, dict)]
        except ValueError:
            pass
        if not errors:  # a 422 about the batch (e.g. the key reused with another body), not its events
            self.drop(batch, f"HTTP 422{_detail(answer.body)}")
            return
        logger.warning(
            "tally_client: batch %s: the server rejected all %d events (422): %s",
            batch.key,
            len(batch),
            _summary(errors),
        )
        self.call_rejected(batch, errors)
        self._resolve(batch, sent=0, rejected=len(batch))

    def drop(self, batch: Batch, reason: str) -> None:
        logger.error("tally_client: dropped batch %s (%d events): %s", batch.key, len(batch), reason)
        self.call_dropped(batch.events, reason)
        self._resolve(batch, dropped=len(batch))

    def drop_pending(self, reason: str) -> None:
        """At close: everything still queued or batched is dropped, loudly."""
        with self.cv:
            events = list(self.queue)
            self.queue.clear()
        batch = self.batcher.take()
        rest = (batch.events if batch else []) + events
        if rest:
            self.give_up(Batch(rest), reason)
        for old in self.take_recovered():
            self.give_up(old, reason)

    def _resolve(self, batch: Batch, *, sent: int = 0, rejected: int = 0, dropped: int = 0, spooled: int = 0) -> None:
        with self.cv:
            self.sent += sent
            self.rejected += rejected
            self.dropped += dropped
            self.spooled += spooled
            self.outstanding -= len(batch)
            self.finished += len(batch)
            self.cv.notify_all()

    def call_rejected(self, batch: Batch, rejected: list[dict[str, Any]]) -> None:
        if self.on_rejected is not None:
            try:
                self.on_rejected(decode_events(batch.events), rejected)
            except Exception:
                logger.exception("tally_client: the on_rejected callback raised")

    def call_dropped(self, events: list[bytes], reason: str) -> None:
        if self.on_dropped is not None:
            try:
                self.on_dropped(decode_events(events), reason)
            except Exception:
                logger.exception("tally_client: the on_dropped callback raised")


class Counters:
    """The counters both clients show, read from their Core (one definition for Client and AsyncClient)."""

    _core: Core

    def stats(self) -> Stats:
        return self._core.stats()

    @property
    def sent(self) -> int:
        return self._core.sent

    @property
    def retried(self) -> int:
        return self._core.retried

    @property
    def rejected(self) -> int:
        return self._core.rejected

    @property
    def dropped(self) -> int:
        return self._core.dropped

    @property
    def queue_depth(self) -> int:
        return self._core.outstanding


def sent_at() -> int:
    return now_ms()


def _detail(body: bytes) -> str:
    """A problem's `detail`, shortened, for logs and drop reasons."""
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    if isinstance(doc, dict) and isinstance(doc.get("detail"), str):
        return f": {doc['detail'][:300]}"
    return ""


def _summary(rejected: list[dict[str, Any]]) -> str:
    shown = "; ".join(f"[{r.get('index')}] {str(r.get('error'))[:200]}" for r in rejected[:3])
    return shown + (f"; and {len(rejected) - 3} more" if len(rejected) > 3 else "")
