"""The soak's dashboard: polls the query API at a steady pace, cached and `no-cache`, and
checks each answer.

Beyond the status, the uncached total over the last 4 h is checked live: it never goes
down (counts only grow), and it never exceeds the events that got a 2xx plus those whose
answer is still pending; so an event counted twice, even briefly, fails the soak.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from tests.soak.client import Answer, Client, ClientError
from tests.soak.ledger import Ledger
from tests.soak.traffic import PROBLEM_JSON

RANGE = {"from": "-4h", "to": "now"}  # the events are at most 3 h old when sent
CACHED = {**RANGE, "granularity": "hour", "fields": "type,count"}
VIEWS = {**RANGE, "granularity": "hour", "fields": "bucket,properties_path,count",
         "filter[properties_country]": "DE,US", "limit": "100"}
TOTAL = {**RANGE, "fields": "count"}
ROTATION = ("cached", "views", "total", "etag", "cached", "lag", "csv", "total", "list", "bad")
CACHE_STATES = {"hit", "stale", "miss"}


@dataclass
class Poller:
    http: Client
    ledger: Ledger  # the ingest side's ledger: the bound on what a query may see
    rate: float  # requests/s
    answers: Ledger = field(default_factory=Ledger)
    etag: str | None = None
    last_total: int = 0
    lag_max: int = 0
    cache: dict[str, int] = field(default_factory=dict)  # X-Cache value -> responses

    async def run(self, stop: asyncio.Event) -> None:
        started, n = time.monotonic(), 0
        while not stop.is_set():
            await self.one(ROTATION[n % len(ROTATION)])
            n += 1
            await asyncio.sleep(max(0.0, started + n / self.rate - time.monotonic()))

    async def one(self, kind: str) -> None:
        params: dict[str, str] = {}
        headers: dict[str, str] = {}
        path = "/v1/rollups/events_by_type"
        if kind == "views":
            path, params = "/v1/rollups/page_views", VIEWS
        elif kind in ("cached", "etag"):
            params = CACHED
            if kind == "etag" and self.etag:
                headers["if-none-match"] = self.etag
        elif kind == "total":
            params, headers = TOTAL, {"cache-control": "no-cache"}
        elif kind == "csv":
            params = {**CACHED, "format": "csv"}
        elif kind == "lag":
            path = "/v1/ops/lag"
        elif kind == "list":
            path = "/v1/rollups"
        elif kind == "bad":
            params = {**CACHED, "fields": "type,no_such_column"}
        started = time.perf_counter()
        try:
            r = await self.http.get(path, params=params, headers=headers)
        except ClientError as exc:
            self.answers.record(kind, "no answer", time.perf_counter() - started, str(exc))
            return
        self.answers.record(kind, r.status_code, time.perf_counter() - started, self.check(kind, r, headers))

    def check(self, kind: str, r: Answer, sent: dict[str, str]) -> str | None:
        """None when the answer is the expected one, else why not."""
        if kind == "bad":
            if r.status_code != 400 or not r.headers.get("content-type", "").startswith(PROBLEM_JSON):
                return f"expected a 400 problem: {r.status_code} {r.text[:200]}"
            return None if "no_such_column" in r.json().get("detail", "") else f"400 not naming the column: {r.text}"
        if kind == "etag" and r.status_code == 304:
            return None if r.headers.get("etag") == sent.get("if-none-match") else "304 with another ETag"
        if r.status_code != 200:
            return f"expected 200: {r.text[:300]}"
        if kind in ("cached", "views", "total", "etag", "csv"):
            state = r.headers.get("x-cache", "")
            self.cache[state] = self.cache.get(state, 0) + 1
            if state not in ({"miss"} if kind == "total" else CACHE_STATES):
                return f"X-Cache {state!r}"
        if kind == "cached":
            self.etag = r.headers.get("etag")
        if kind == "csv":
            return None if r.headers.get("content-type", "").startswith("text/csv") else "csv not text/csv"
        body: Any = r.json()
        if kind == "total":
            return self._total(body)
        if kind == "lag":
            self.lag_max = max(self.lag_max, int(body["total_lag_records"]))
            return None if body["total_lag_records"] >= 0 else f"negative lag: {body}"
        if kind == "list":
            names = {rollup["name"] for rollup in body["data"]}
            return None if {"events_by_type", "page_views"} <= names else f"rollups listed: {names}"
        return None if isinstance(body.get("data"), list) else f"no data list: {r.text[:200]}"

    def _total(self, body: dict[str, Any]) -> str | None:
        rows = body["data"]
        total = int(rows[0]["count"] or 0) if rows else 0
        bound = self.ledger.upper_bound()  # read after the answer: it only grows meanwhile
        previous, self.last_total = self.last_total, total
        if total < previous:
            return f"the total went down: {previous} -> {total}"
        if total > bound:
            return f"the total {total} exceeds the {bound} events accepted or pending: counted twice?"
        return None
