"""The soak's producer: an open-loop stream of ingest requests of every kind, each checked
against the one answer README promises for it.

Kinds (weights in KINDS):
- good: valid events in every body form (object, array, NDJSON, gzip) -> 202, all accepted;
- partial: valid events with invalid ones at known indices -> 202 listing exactly those;
- invalid: no valid event -> 422 problem+json listing each;
- malformed: a truncated JSON body -> 400 problem+json;
- media: text/plain -> 415; oversize: one event more than TALLY_MAX_EVENTS -> 413;
- keyed: a batch with an Idempotency-Key (ids derived by ingest), then its retry -> the
  same status and bytes with `Idempotent-Replayed: true` (kind `replay`), sometimes the
  same key with another body -> 422 (kind `key-conflict`); a fifth of keyed batches hold no
  valid event, so a kept 422 is replayed too;
- resend: events that carry their own event_id and were already accepted, sent again
  without a key -> 202; with TALLY_DEDUP the consumers must not count them again.

Open loop: request k starts at start + k / rate whatever the earlier ones are doing, so a
slow server shows up as latency and concurrency, not as a politely slower client.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests import oracle
from tests.e2e.conftest import FORMS, encode
from tests.soak.client import Answer, Client, ClientError
from tests.soak.ledger import Ledger

KINDS: dict[str, float] = {
    "good": 0.50,
    "partial": 0.14,
    "keyed": 0.12,
    "resend": 0.12,
    "invalid": 0.05,
    "malformed": 0.03,
    "media": 0.02,
    "oversize": 0.02,
}
GOOD_SIZE = (20, 80)
POOL = 5_000  # accepted events with their own event_id, kept for resends
PROBLEM_JSON = "application/problem+json"

Check = Callable[[Answer], str | None]  # None: the expected answer


def accepted(n: int, rejected: list[int]) -> Check:
    def check(r: Answer) -> str | None:
        if r.status_code != 202:
            return f"expected 202: {r.text[:300]}"
        body = r.json()
        if body.get("accepted") != n or [x["index"] for x in body.get("rejected", [])] != rejected:
            return f"expected accepted={n} rejected at {rejected}: {r.text[:300]}"
        return None

    return check


def problem(status: int, errors: int | None = None) -> Check:
    def check(r: Answer) -> str | None:
        if r.status_code != status:
            return f"expected {status}: {r.text[:300]}"
        if not r.headers.get("content-type", "").startswith(PROBLEM_JSON):
            return f"not {PROBLEM_JSON}: {r.headers.get('content-type')}"
        body = r.json()
        if body.get("status") != status or not body.get("detail"):
            return f"problem without its status or detail: {r.text[:300]}"
        if errors is not None and len(body.get("errors", [])) != errors:
            return f"expected {errors} errors listed: {r.text[:300]}"
        return None

    return check


def replayed(first: Answer) -> Check:
    def check(r: Answer) -> str | None:
        if r.status_code != first.status_code or r.content != first.content:
            return f"not the first answer ({first.status_code} {first.text[:120]}): {r.status_code} {r.text[:120]}"
        if r.headers.get("idempotent-replayed") != "true":
            return "no Idempotent-Replayed: true"
        return None

    return check


def with_invalid(rng: random.Random, valid: list[Any], count: int) -> tuple[list[Any], list[int]]:
    """`valid` with `count` invalid events at random places, and those places' indices."""
    batch: list[Any] = list(valid)
    for _ in range(count):
        at = rng.randrange(len(batch) + 1)
        batch[at:at] = [("bad", oracle.invalid_events(rng)[0])]
    indices = [i for i, e in enumerate(batch) if isinstance(e, tuple)]
    return [e[1] if isinstance(e, tuple) else e for e in batch], indices


@dataclass
class Ingest:
    http: Client
    rng: random.Random
    ledger: Ledger
    max_events: int
    sent: int = 0  # requests started
    pool: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, kind: str, body: bytes, headers: dict[str, str], check: Check,
                   valid: int = 0) -> Answer | None:
        """POST one batch; the response when it was the expected one."""
        started = time.perf_counter()
        self.ledger.pending += valid
        try:
            r = await self.http.post("/v1/events", body, headers)
        except ClientError as exc:
            self.ledger.record(kind, "no answer", time.perf_counter() - started, str(exc))
            return None
        finally:
            self.ledger.pending -= valid
        why = check(r)
        self.ledger.record(kind, r.status_code, time.perf_counter() - started, why)
        return r if why is None else None

    def events(self, n: int) -> list[dict[str, Any]]:
        return oracle.make_events(self.rng, n, int(time.time() * 1000))

    def _remember(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            if "event_id" not in event:
                continue
            if len(self.pool) < POOL:
                self.pool.append(event)
            else:
                self.pool[self.rng.randrange(POOL)] = event

    async def one(self) -> None:
        """One request of a kind drawn by weight (and, for keyed, its follow-ups)."""
        self.sent += 1
        kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        if kind == "resend" and not self.pool:
            kind = "good"
        await getattr(self, "_" + kind)()

    async def _good(self, kind: str = "good", size: int | None = None) -> None:
        events = self.events(size or self.rng.randint(*GOOD_SIZE))
        body, headers = encode(events, FORMS[self.sent % len(FORMS)])
        if await self.send(kind, body, headers, accepted(len(events), []), len(events)):
            self.ledger.accept(events)
            self._remember(events)

    async def burst(self, concurrency: int, rounds: int) -> None:
        """`rounds` times, `concurrency` of the largest good batches at once: the most the soak ever has
        in flight at the server, so each process's memory high-water mark is set during the warm-up. (RSS
        keeps its high-water mark: a later load spike on a shared machine would otherwise look like a leak.)"""
        for _ in range(rounds):
            self.sent += 1
            await asyncio.gather(*(self._good("burst", GOOD_SIZE[1]) for _ in range(concurrency)))

    async def _partial(self) -> None:
        events = self.events(self.rng.randint(*GOOD_SIZE))
        batch, bad = with_invalid(self.rng, events, self.rng.randint(1, 3))
        body, headers = encode(batch, FORMS[self.sent % len(FORMS)])
        if await self.send("partial", body, headers, accepted(len(events), bad), len(events)):
            self.ledger.accept(events)
            self._remember(events)

    async def _invalid(self) -> None:
        batch, _ = with_invalid(self.rng, [], self.rng.randint(1, 5))
        body, headers = encode(batch, "object")
        await self.send("invalid", body, headers, problem(422, len(batch)))

    async def _malformed(self) -> None:
        body = orjson.dumps({"events": self.events(5)})
        await self.send("malformed", body[: self.rng.randrange(1, len(body) - 1)],
                        {"content-type": "application/json"}, problem(400))

    async def _media(self) -> None:
        await self.send("media", orjson.dumps(self.events(3)), {"content-type": "text/plain"}, problem(415))

    async def _oversize(self) -> None:
        body = orjson.dumps([{"type": "x"}] * (self.max_events + 1))
        await self.send("oversize", body, {"content-type": "application/json"}, problem(413))

    async def _resend(self) -> None:
        assert self.pool
        events = self.rng.sample(self.pool, min(len(self.pool), self.rng.randint(1, 40)))
        body, headers = encode(events, "object")
        if await self.send("resend", body, headers, accepted(len(events), [])):
            self.ledger.resent += len(events)

    async def _keyed(self) -> None:
        key = f"soak-{uuid.UUID(int=self.rng.getrandbits(128), version=4).hex}"
        if self.rng.random() < 0.2:
            events: list[dict[str, Any]] = []
            batch, _ = with_invalid(self.rng, [], self.rng.randint(1, 3))
            check = problem(422, len(batch))
        else:
            # Without their own ids, so ingest derives them from the key (README: Idempotency keys).
            events = [{k: v for k, v in e.items() if k != "event_id"} for e in self.events(self.rng.randint(10, 40))]
            batch, check = events, accepted(len(events), [])
        body, headers = encode(batch, "object")
        headers = {**headers, "idempotency-key": key}
        first = await self.send("keyed", body, headers, check, len(events))
        if first is None:
            return
        if events:
            self.ledger.accept(events)
        await asyncio.sleep(self.rng.uniform(0.0, 0.5))
        if await self.send("replay", body, headers, replayed(first)):
            self.ledger.replays += 1
        if self.rng.random() < 0.3:
            other, _ = encode(self.events(3), "object")
            await self.send("key-conflict", other, headers, problem(422))


@dataclass
class Schedule:
    late_max: float = 0.0  # worst delay of a request's start behind its slot, seconds
    inflight_max: int = 0
    dropped: int = 0  # slots skipped because MAX_INFLIGHT requests were outstanding (a starved machine)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> share of a core used meanwhile (the report)


MAX_INFLIGHT = 256


async def open_loop(ingest: Ingest, rate: float, seconds: float) -> Schedule:
    """Start one request every 1/rate s for `seconds`, then wait for the stragglers."""
    out = Schedule()
    tasks: set[asyncio.Task[None]] = set()
    failed: list[BaseException] = []

    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            failed.append(exc)

    started = time.monotonic()
    slot = 0
    while slot / rate < seconds and not failed:
        delay = started + slot / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            out.late_max = max(out.late_max, -delay)
        slot += 1
        if len(tasks) >= MAX_INFLIGHT:
            out.dropped += 1
            continue
        task = asyncio.create_task(ingest.one())
        tasks.add(task)
        task.add_done_callback(done)
        out.inflight_max = max(out.inflight_max, len(tasks))
    await asyncio.gather(*tasks, return_exceptions=True)
    if failed:
        raise failed[0]  # a bug in the client, not an answer of the server
    return out
