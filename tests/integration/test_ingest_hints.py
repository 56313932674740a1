"""Issue 15's helpful refusals, over real HTTP to the real ingest app (real Kafka, Postgres, Redis)."""

from __future__ import annotations

import re
import time
from datetime import datetime

import httpx
import pytest

from core.settings import Settings
from ingest.app import create_app
from tests.conftest import serve

pytestmark = pytest.mark.integration

INSTANT = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{3})?Z)"


def epoch_ms(instant: str) -> int:
    return int(datetime.fromisoformat(instant).timestamp() * 1000)


async def test_a_bare_event_object_is_a_400_that_says_how_to_wrap_it(migrated: Settings) -> None:
    async with serve(create_app(migrated)) as url, httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/v1/events", json={"type": "signup"})
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["status"] == 400 and problem["instance"] == "/v1/events"
    assert problem["detail"] == (
        'unknown top-level field(s): type; to send one event, wrap it in [...] or {"events": [...]}'
    )


async def test_ts_refusals_show_the_time_judged_and_the_window_edge(migrated: Settings) -> None:
    before = time.time_ns() // 1_000_000
    seconds = before // 1000
    async with serve(create_app(migrated)) as url, httpx.AsyncClient(base_url=url) as http:
        r = await http.post(
            "/v1/events",
            json=[
                {"type": "a", "ts": seconds},
                {"type": "b", "ts": 1_700_000_000_000},
                {"type": "c", "ts": before + 3_600_000},
            ],
        )
    after = time.time_ns() // 1_000_000
    assert r.status_code == 422
    seconds_err, old_err, future_err = (e["error"] for e in r.json()["errors"])

    lateness = migrated.lateness_seconds
    match = re.fullmatch(
        rf"ts {seconds} is {INSTANT} as epoch milliseconds, older than the lateness window \({lateness} s, starts "
        rf"{INSTANT}\): did you send seconds\? ts takes epoch milliseconds or RFC 3339",
        seconds_err,
    )
    assert match, seconds_err
    assert epoch_ms(match[1]) == seconds
    assert before - lateness * 1000 <= epoch_ms(match[2]) <= after - lateness * 1000

    match = re.fullmatch(
        rf"ts 1700000000000 is 2023-11-14T22:13:20Z, older than the lateness window \({lateness} s, starts {INSTANT}\)",
        old_err,
    )
    assert match, old_err

    future = migrated.future_seconds
    match = re.fullmatch(
        rf"ts {before + 3_600_000} is {INSTANT}, more than {future} s in the future \(the window ends {INSTANT}\)",
        future_err,
    )
    assert match, future_err
    assert epoch_ms(match[1]) == before + 3_600_000
    assert before + future * 1000 <= epoch_ms(match[2]) <= after + future * 1000
