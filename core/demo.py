"""Realistic synthetic traffic for `tally dev --demo`, so a new user sees numbers move."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

log = logging.getLogger(__name__)

TYPES = [("page_view", 60), ("add_to_cart", 12), ("purchase", 6), ("signup", 3), ("search", 19)]
SOURCES = [("web", 55), ("ios", 25), ("android", 20)]
COUNTRIES = [("US", 30), ("DE", 12), ("GB", 10), ("IN", 14), ("BR", 8), ("FR", 7), ("JP", 9), ("NG", 4), ("CA", 6)]
PATHS = ["/", "/pricing", "/docs", "/blog", "/product/42", "/product/7", "/cart", "/checkout"]
DAY_MS = 86_400_000


def _pick(rng: random.Random, weighted: list[tuple[str, int]]) -> str:
    return rng.choices([v for v, _ in weighted], [w for _, w in weighted])[0]


def demo_event(rng: random.Random, now_ms: int) -> dict[str, Any]:
    """One event; a third are live, the rest spread over the past day (more of them recent)."""
    age = 0 if rng.random() < 0.34 else int(DAY_MS * rng.random() ** 2)
    etype = _pick(rng, TYPES)
    props: dict[str, Any] = {"country": _pick(rng, COUNTRIES), "path": rng.choice(PATHS)}
    if etype in ("purchase", "add_to_cart"):
        props["amount"] = round(rng.lognormvariate(3.2, 0.8), 2)
    event: dict[str, Any] = {
        "type": etype,
        "ts": now_ms - age,
        "source": _pick(rng, SOURCES),
        "user_id": f"u{rng.randrange(5000)}",
        "properties": props,
    }
    if rng.random() < 0.002:  # the odd broken event, to show partial acceptance
        event["type"] = "not a valid type!"
    return event


async def run_demo(ingest_url: str, *, events_per_second: int = 500, batch_size: int = 100) -> None:
    import httpx

    rng = random.Random()  # noqa: S311 - demo data, not secrets
    interval = batch_size / events_per_second
    sent = 0
    async with httpx.AsyncClient(base_url=ingest_url, timeout=10) as http:
        while True:
            started = time.monotonic()
            now = int(time.time() * 1000)
            batch = [demo_event(rng, now) for _ in range(batch_size)]
            try:
                response = await http.post("/v1/events", json={"events": batch})
                if response.status_code == 202:
                    sent += response.json()["accepted"]
                    if sent % 10_000 < batch_size:
                        log.info("demo: %d events accepted so far", sent)
                else:
                    log.warning("demo: ingest answered %s: %s", response.status_code, response.text[:200])
            except httpx.HTTPError as exc:
                log.warning("demo: %s", exc)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
