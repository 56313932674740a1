"""AsyncClient: the same shape as Client for asyncio. capture() is a plain (non-blocking) method
called on the event loop's thread; one task delivers, the blocking HTTP attempt runs in a thread."""

from __future__ import annotations

import asyncio
import contextlib
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


class AsyncClient(Counters):
    """`async with AsyncClient(url) as tally: tally.capture(...)`; `await tally.flush(5)`.

    Under full_policy="block" capture() cannot wait (it would stall the event loop): it raises
    QueueFull at once. Close it (`async with` or `await aclose()`): at interpreter exit there is
    no event loop to deliver with, so what an unclosed AsyncClient still holds is dropped through
    on_dropped and logged."""

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
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _drop_at_exit, self._core)
        self._finalizer.atexit = True

    def _ensure_task(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tally-client")

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
        """Queue one event (call it on the event loop's thread). Raises ValueError/TypeError for a
        malformed event, QueueFull when full under full_policy="block", ClientClosed after aclose()."""
        event = self._core.encode(type, source, user_id, session_id, properties, ts, event_id)
        self._ensure_task()
        if self._core.offer(event, wait=0.0):
            self._wake.set()

    async def flush(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - Client's shape
        """Send everything captured so far and wait until each event is resolved; False on timeout."""
        core = self._core
        if core.enqueued == core.finished:
            return True
        self._ensure_task()
        deadline = None if timeout is None else time.monotonic() + timeout
        target = core.enqueued
        core.flushing += 1
        self._wake.set()
        try:
            while core.finished < target:
                if self._task is None or self._task.done():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._progress.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._progress.wait(), left)
            return True
        finally:
            core.flushing -= 1

    async def aclose(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - Client's shape
        """Flush (up to `timeout`, default Options.shutdown_timeout) and stop; what is still
        undelivered is dropped through on_dropped. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.flush(self.options.shutdown_timeout if timeout is None else timeout)
        self._stopping.set()
        with self._core.cv:
            self._core.closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
        else:
            self._core.drop_pending("client closed before the events were sent")
        self._finalizer.detach()
        await asyncio.to_thread(self._transport.close)
        if self._core.spool is not None:
            self._core.spool.close()

    async def __aenter__(self) -> AsyncClient:
        self._ensure_task()
        return self

    async def __aexit__(self, *exc: object | TracebackType | None) -> None:
        await self.aclose()

    # --- the task ---

    async def _run(self) -> None:
        core = self._core
        try:
            for batch in core.take_recovered():
                await self._deliver(batch)
                self._progress.set()
            while True:
                while core.idle() and not core.closed:
                    wait = core.wait_time(time.monotonic())
                    if wait == 0.0:
                        break
                    self._wake.clear()
                    if not (core.idle() and not core.closed):
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                closing = core.closed
                for batch in core.next_batches(time.monotonic()):
                    await self._deliver(batch)
                    self._progress.set()
                if closing:
                    break
        except BaseException:
            logger.exception("tally_client: the delivery task failed")
            raise
        finally:
            core.drop_pending("client closed before the events were sent")
            self._progress.set()

    async def _deliver(self, batch: Batch) -> None:
        core = self._core
        if self._stopping.is_set():
            core.give_up(batch, "client closed before the batch was sent")
            return
        core.prepare(batch)
        first_at = time.monotonic()
        while True:
            batch.attempts += 1
            answer: Response | BaseException
            try:
                answer = await asyncio.to_thread(self._transport.post, batch.body, key=batch.key, gzipped=batch.gzipped)
            except Exception as exc:
                answer = exc
            decision = core.judge(batch, answer, first_at, time.monotonic())
            if decision.verdict is not Verdict.RETRY:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), decision.delay)
            if self._stopping.is_set():
                core.give_up(batch, f"client closed while retrying (after {batch.attempts} attempts)")
                return


def _drop_at_exit(core: Core) -> None:
    if core.outstanding:
        logger.error("tally_client: an AsyncClient was not closed (use `async with` or `await aclose()`)")
        core.drop_pending("interpreter exit: the AsyncClient was not closed")
