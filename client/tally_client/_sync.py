"""Client: capture() from any thread; one background thread batches and delivers."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Mapping
from datetime import datetime
from types import TracebackType
from typing import Any
from uuid import UUID

from tally_client._batching import Batch
from tally_client._core import Core, Counters, logger
from tally_client._options import DroppedCallback, Options, RejectedCallback
from tally_client._retry import Verdict
from tally_client._transport import Response, Transport


class Client(Counters):
    """A Tally producer. `capture()` validates and queues an event and returns at once; a daemon
    thread sends batches (POST /v1/events, one Idempotency-Key per batch for all its attempts).
    `flush()` waits for what was captured so far; `close()` flushes and stops, and runs at
    interpreter exit for a client not closed."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        api_key: str | None = None,
        *,
        options: Options | None = None,
        on_rejected: RejectedCallback | None = None,
        on_dropped: DroppedCallback | None = None,
    ) -> None:
        self.options = options or Options()
        self._transport = Transport(
            base_url, path=self.options.path, api_key=api_key, timeout=self.options.request_timeout
        )
        self._core = Core(self.options, on_rejected, on_dropped)
        self._stop = threading.Event()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="tally-client", daemon=True)
        self._worker.start()
        # The exit hook holds the client weakly: an unreferenced client is still closed by its
        # finalizer, which the hook also triggers.
        self._finalizer = weakref.finalize(self, _close_at_exit, self._core, self._stop, self._worker)
        self._finalizer.atexit = True  # runs at interpreter exit (before daemon threads stop)

    # --- the application's side ---

    def capture(
        self,
        type: str,
        *,
        source: str | None = None,
        user_id: str | None = None,
        session_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
        ts: datetime | int | None = None,
        event_id: str | UUID | None = None,
    ) -> None:
        """Queue one event; never waits on the network. Raises ValueError/TypeError for a
        malformed event, QueueFull (full_policy="block", no room within block_timeout),
        ClientClosed after close()."""
        event = self._core.encode(type, source, user_id, session_id, properties, ts, event_id)
        in_worker = threading.current_thread() is self._worker  # a callback must not wait on itself
        self._core.offer(event, wait=0.0 if in_worker else self.options.block_timeout)

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything captured before this call and wait until each event is resolved (sent,
        rejected or dropped). Returns False if `timeout` passed first."""
        core = self._core
        deadline = None if timeout is None else time.monotonic() + timeout
        with core.cv:
            target = core.enqueued
            core.flushing += 1
            core.cv.notify_all()
            try:
                while core.finished < target:
                    if not self._worker.is_alive():
                        return False
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    core.cv.wait(left if left is not None else 1.0)
                return True
            finally:
                core.flushing -= 1

    def close(self, timeout: float | None = None) -> None:
        """Flush (up to `timeout`, default Options.shutdown_timeout), stop the worker; events still
        undelivered then are dropped through on_dropped. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.flush(self.options.shutdown_timeout if timeout is None else timeout)
        self._core.flushed_by_close = True
        self._finalizer()
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.close()

    # --- the worker ---

    def _run(self) -> None:
        core = self._core
        try:
            for batch in core.take_recovered():
                self._deliver(batch)
            while True:
                with core.cv:
                    while core.idle() and not core.closed:
                        wait = core.wait_time(time.monotonic())
                        if wait == 0.0:
                            break
                        core.cv.wait(wait)
                    closing = core.closed
                for batch in core.next_batches(time.monotonic()):
                    self._deliver(batch)
                if closing:
                    break
        except BaseException:  # never die silently: whatever is left is dropped, loudly
            logger.exception("tally_client: the delivery thread failed")
        finally:
            core.drop_pending("client closed before the events were sent")

    def _deliver(self, batch: Batch) -> None:
        core = self._core
        if self._stop.is_set():
            core.give_up(batch, "client closed before the batch was sent")
            return
        core.prepare(batch)
        first_at = time.monotonic()
        while True:
            batch.attempts += 1
            answer: Response | BaseException
            try:
                answer = self._transport.post(batch.body, key=batch.key, gzipped=batch.gzipped)
            except Exception as exc:
                answer = exc
            decision = core.judge(batch, answer, first_at, time.monotonic())
            if decision.verdict is not Verdict.RETRY:
                return
            if self._stop.wait(decision.delay):
                core.give_up(batch, f"client closed while retrying (after {batch.attempts} attempts)")
                return


def _close_at_exit(core: Core, stop: threading.Event, worker: threading.Thread) -> None:
    """Stop the worker: the queue is drained first for up to shutdown_timeout (the flush is done
    here too, for a client closed only by the exit hook)."""
    deadline = time.monotonic() + (0.0 if core.flushed_by_close else core.options.shutdown_timeout)
    with core.cv:
        target = core.enqueued
        core.flushing += 1
        core.cv.notify_all()
        while core.finished < target and worker.is_alive():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            core.cv.wait(left)
        core.flushing -= 1
    stop.set()  # first: what is still undelivered is dropped rather than tried once more
    with core.cv:
        core.closed = True
        core.cv.notify_all()
    if worker is not threading.current_thread():
        worker.join(core.options.request_timeout + 1.0)
    if core.spool is not None and not worker.is_alive():
        core.spool.close()
