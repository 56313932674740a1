"""The console against a running stack (real `tally ingest` and `tally consume`, the query app
under uvicorn) with known data: the chart and the table show exactly the numbers the API
returns and that the posted events add up to; the ops view shows lag rising while the consumer
is stopped and falling back to 0 when it runs again."""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from playwright.async_api import Browser, Page

from core.auth import KeyStore
from core.db import write_engine
from core.settings import Settings
from query.app import create_app
from tests import oracle
from tests.conftest import serve
from tests.console.conftest import artifacts_dir, open_tab
from tests.e2e.conftest import wait_for_total
from tests.processes import TallyProcess, tally_process

pytestmark = pytest.mark.e2e

WAIT_MS = 30_000


def shown(value: Any) -> str:
    """A number as the console writes it (en-US grouping, every digit the API sent, no trailing zeros)."""
    if value is None:
        return "—"
    number = Decimal(str(value))
    if number == number.to_integral_value():
        return f"{int(number):,}"
    return f"{number.normalize():,}"


def bucket_text(bucket: str) -> str:
    return datetime.fromisoformat(bucket).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


async def post(ingest: TallyProcess, events: list[dict[str, Any]]) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ingest.port}", timeout=30) as http:
        for i in range(0, len(events), 100):
            response = await http.post("/v1/events", content=orjson.dumps({"events": events[i:i + 100]}),
                                       headers={"content-type": "application/json"})
            assert response.status_code == 202 and response.json()["rejected"] == [], response.text


async def api_json(url: str, key: str | None = None) -> Any:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.get(url, headers=headers)
    assert response.status_code == 200, response.text
    return json.loads(response.content, parse_float=Decimal)


async def api_urls(page: Page) -> dict[str, str]:
    pairs = await page.eval_on_selector_all(
        "#api-urls .url",
        "rows => rows.map(r => [r.querySelector('.what').textContent, r.querySelector('code').textContent])")
    return dict(pairs)


async def table(page: Page) -> list[list[str]]:
    return list(await page.eval_on_selector_all(
        "#result-table tr", "rows => rows.map(r => [...r.children].map(c => c.textContent))"))


async def legend_at(page: Page, x_index: int, count: int) -> list[list[str]]:
    """Hover the chart over bucket `x_index` of `count` (uPlot spans the x axis from the first
    bucket to the last) and read its legend: [label, value] per series, time first."""
    box = await page.locator("#chart .u-over").bounding_box()
    assert box is not None
    x = box["x"] + ((box["width"] - 1) * x_index / (count - 1) if count > 1 else box["width"] / 2)
    await page.mouse.move(x, box["y"] + box["height"] / 2)
    return list(await page.eval_on_selector_all(
        "#chart .u-legend tr.u-series",
        "rows => rows.map(r => [r.querySelector('.u-label').textContent, r.querySelector('.u-value').textContent])"))


async def wait_for_series(page: Page, fragment: str) -> None:
    """Until the answer to the query whose series URL contains `fragment` is drawn."""
    await page.wait_for_function(
        """fragment => [...document.querySelectorAll('#api-urls code')].some(c => c.textContent.includes(fragment))
                       && document.querySelector('#result-status').textContent.includes('rows ·')""",
        arg=fragment, timeout=WAIT_MS)


@pytest.fixture
def query_settings(migrated: Settings) -> Settings:
    return migrated.model_copy(update={"lag_sample_seconds": 1.0, "lag_window_samples": 3})


async def test_explore_shows_the_api_numbers_in_chart_and_table(
    query_settings: Settings, browser: Browser, tmp_path: Path
) -> None:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start, end = hour - timedelta(hours=5), hour + timedelta(hours=1)
    now_ms = int(time.time() * 1000)
    rng = random.Random(9)
    events = oracle.make_events(rng, 600, now_ms, span_ms=5 * 3_600_000)  # all after `start`
    for event in events[:40]:  # a value filter[...] cannot name (it splits on commas)
        event["source"] = "web,beta"
    ingest = tally_process("ingest", query_settings, tmp_path).start()
    consumer = tally_process("consume", query_settings, tmp_path).start()
    secured = query_settings.model_copy(update={"auth": True})
    store = KeyStore(write_engine(str(secured.postgres_url), pool_size=1), cache_seconds=0)
    try:
        _, key = await store.create("console", ["query"])
        await post(ingest, events)
        await wait_for_total(str(query_settings.postgres_url), len(events))
        # Independently: counts per (hour, type), and amounts per hour, straight from the events.
        counts: dict[tuple[datetime, str], int] = defaultdict(int)
        amounts: dict[datetime, Decimal | None] = {}
        for (bucket, type_, _source), row in oracle.events_by_type(events, "hour").items():
            counts[bucket, type_] += row["count"]
            if row["sum"] is not None:
                amounts[bucket] = (amounts.get(bucket) or Decimal(0)) + row["sum"]
            else:
                amounts.setdefault(bucket, None)
        per_type: dict[str, int] = defaultdict(int)
        for (_, type_), n in counts.items():
            per_type[type_] += n
        top3 = sorted(per_type, key=lambda t: (-per_type[t], t))[:3]

        async with serve(create_app(secured)) as url:
            tab = await open_tab(browser)
            page = tab.page
            await page.goto(f"{url}/console/")
            # Auth is on: the console asks for a key before it shows anything.
            await page.locator("#key-panel").wait_for(state="visible", timeout=WAIT_MS)
            assert await page.locator("#rollup-list li").count() == 0
            await page.fill("#key-input", key)
            await page.click("#key-form button[type=submit]")
            await page.click("#rollup-list button[data-rollup=events_by_type]", timeout=WAIT_MS)
            await page.locator("#query-form").wait_for(state="visible")
            assert await page.locator("#rollup-list button[aria-pressed=true]").inner_text() == \
                "events_by_type\n2 dimensions · 9 measures · minute"
            await page.fill("#from", start.isoformat().replace("+00:00", "Z"))
            await page.fill("#to", end.isoformat().replace("+00:00", "Z"))
            await page.select_option("#measure", "count")
            await page.select_option("#granularity", "hour")
            await page.select_option("#split", "type")
            await page.fill("#top", "3")
            await page.click("#query-form button[type=submit]")
            await wait_for_series(page, f"from={start.isoformat().replace('+00:00', 'Z')}")

            urls = await api_urls(page)
            assert list(urls) == ["Top values", "Series"]
            assert urls["Top values"] == (
                f"{url}/v1/rollups/events_by_type?from={start:%Y-%m-%dT%H:%M:%SZ}&to={end:%Y-%m-%dT%H:%M:%SZ}"
                "&granularity=hour&fields=type,count&order=-count&limit=3&total=true")
            top = await api_json(urls["Top values"], key)
            assert [r["type"] for r in top["data"]] == top3 and top["meta"]["total"] == len(per_type)
            series = await api_json(urls["Series"], key)  # the URL shown is the one that answers
            expected_rows = [
                {"bucket": b.strftime("%Y-%m-%dT%H:%M:%SZ"), "type": t, "count": n}
                for (b, t), n in sorted(counts.items()) if t in top3
            ]
            assert series["data"] == expected_rows

            caption = await page.inner_text("#chart-caption")
            assert caption == f"count per hour, top 3 of {len(per_type)} type values"
            assert await table(page) == [
                ["bucket", "type", "count"],
                *[[bucket_text(r["bucket"]), r["type"], shown(r["count"])] for r in series["data"]],
            ]
            buckets = sorted({r["bucket"] for r in series["data"]})
            for i, bucket in enumerate(buckets):
                here = {r["type"]: r["count"] for r in series["data"] if r["bucket"] == bucket}
                assert await legend_at(page, i, len(buckets)) == [
                    ["Time (UTC)", bucket_text(bucket).removesuffix(" UTC")],
                    *[[t, shown(here.get(t, 0))] for t in top3],  # no row: nothing counted, 0
                ], bucket
            await legend_at(page, len(buckets) // 2, len(buckets))  # the legend shows a bucket's values
            await page.screenshot(path=str(artifacts_dir() / "console-explore.png"))
            # The copy button puts the URL shown on the clipboard.
            await page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
            await page.click("#api-urls .url:nth-of-type(2) .copy")
            assert await page.evaluate("() => navigator.clipboard.readText()") == urls["Series"]

            # No split, a decimal measure: one series, the sum over every type, exactly.
            await page.select_option("#split", "")
            await wait_for_series(page, "fields=bucket,count&order=bucket")
            await page.select_option("#measure", "sum_properties_amount")
            await wait_for_series(page, "fields=bucket,sum_properties_amount&order=bucket")
            urls = await api_urls(page)
            assert list(urls) == ["Series"]
            series = await api_json(urls["Series"], key)
            assert series["data"] == [
                {"bucket": b.strftime("%Y-%m-%dT%H:%M:%SZ"), "sum_properties_amount": a}
                for b, a in sorted(amounts.items())
            ]
            assert await table(page) == [
                ["bucket", "sum_properties_amount"],
                *[[bucket_text(r["bucket"]), shown(r["sum_properties_amount"])] for r in series["data"]],
            ]
            for i, r in enumerate(series["data"]):
                assert await legend_at(page, i, len(series["data"])) == [
                    ["Time (UTC)", bucket_text(r["bucket"]).removesuffix(" UTC")],
                    ["sum_properties_amount", shown(r["sum_properties_amount"])],
                ]

            # A sketch measure charts like any other: distinct users per hour and type, the types ranked by
            # their distinct users over the range (a union, not a sum of the hours), exactly (few users).
            users: dict[tuple[datetime, str], set[str]] = defaultdict(set)
            for e in events:
                if e.get("user_id") is not None:
                    users[oracle.floor(oracle.event_time(e), "hour"), e["type"]].add(e["user_id"])
            ranged: dict[str, set[str]] = defaultdict(set)
            for (_, type_), seen in users.items():
                ranged[type_] |= seen
            top2 = sorted(ranged, key=lambda t: (-len(ranged[t]), t))[:2]
            await page.select_option("#measure", "uniq_user_id")
            await page.select_option("#split", "type")
            await page.fill("#top", "2")
            await page.click("#query-form button[type=submit]")
            await wait_for_series(page, "fields=type,uniq_user_id&order=-uniq_user_id&limit=2&")
            urls = await api_urls(page)
            top = await api_json(urls["Top values"], key)
            assert top["data"] == [{"type": t, "uniq_user_id": len(ranged[t])} for t in top2]
            series = await api_json(urls["Series"], key)
            assert series["data"] == [
                {"bucket": b.strftime("%Y-%m-%dT%H:%M:%SZ"), "type": t, "uniq_user_id": len(seen)}
                for (b, t), seen in sorted(users.items()) if t in top2
            ]
            assert await table(page) == [
                ["bucket", "type", "uniq_user_id"],
                *[[bucket_text(r["bucket"]), r["type"], shown(r["uniq_user_id"])] for r in series["data"]],
            ]

            # Split by source: a missing source is "(none)" (asked for as an empty value); a value
            # with a comma cannot be asked for, and the status says it was left out.
            by_source: dict[tuple[datetime, str], int] = defaultdict(int)
            for (bucket, _type, source), row in oracle.events_by_type(events, "hour").items():
                by_source[bucket, source] += row["count"]
            await page.select_option("#measure", "count")
            await page.select_option("#split", "source")
            await page.fill("#top", "5")  # all five sources
            await page.click("#query-form button[type=submit]")
            await wait_for_series(page, "fields=source,count&order=-count&limit=5&")
            series = await api_json((await api_urls(page))["Series"], key)
            assert series["data"] == [
                {"bucket": b.strftime("%Y-%m-%dT%H:%M:%SZ"), "source": src, "count": n}
                for (b, src), n in sorted(by_source.items()) if src != "web,beta"
            ]
            status = await page.inner_text("#result-status")
            assert status.endswith(" Left out (a comma cannot be filtered for): web,beta."), status
            labels = [label for label, _ in await legend_at(page, 0, 2)][1:]
            assert sorted(labels) == ["(none)", "android", "ios", "web"]

            # A range with nothing in it says so; a bad parameter shows the API's problem.
            await page.fill("#from", "2001-01-01T00:00:00Z")
            await page.fill("#to", "2001-01-02T00:00:00Z")
            await page.click("#query-form button[type=submit]")
            await page.wait_for_function(
                "() => document.querySelector('#result-status').textContent.startsWith('No data')", timeout=WAIT_MS)
            assert await page.locator("#chart-figure").is_hidden() and await page.locator("#table-wrap").is_hidden()
            await page.fill("#from", "yesterday-ish")
            await page.click("#query-form button[type=submit]")
            await page.wait_for_function(
                "() => document.querySelector('#result-status').classList.contains('error')", timeout=WAIT_MS)
            status = await page.inner_text("#result-status")
            assert status.startswith("The query failed: ") and "from" in status, status

            # A phone's width: everything reflows, nothing scrolls sideways.
            await page.fill("#from", start.isoformat().replace("+00:00", "Z"))
            await page.fill("#to", end.isoformat().replace("+00:00", "Z"))
            await page.click("#query-form button[type=submit]")
            await wait_for_series(page, f"from={start:%Y-%m-%dT%H:%M:%SZ}")
            await page.set_viewport_size({"width": 390, "height": 844})
            await page.wait_for_timeout(300)  # the chart follows its container's width
            assert await page.evaluate("document.documentElement.scrollWidth") <= 390
            await page.screenshot(path=str(artifacts_dir() / "console-explore-phone.png"), full_page=True)
            tab.assert_clean("status of 401", "status of 400")  # the browser logs the API's refusals
    finally:
        await store.close()
        consumer.stop()
        ingest.stop()


async def lag_shown(page: Page) -> tuple[int, dict[int, int]]:
    total = await page.get_attribute("#lag-summary [data-total-records]", "data-total-records")
    bars = await page.eval_on_selector_all(
        "#lag-bars .bar.records", "bars => bars.map(b => [Number(b.dataset.partition), Number(b.dataset.value)])")
    return int(total or -1), dict(bars)


async def counter_row(page: Page, name: str) -> tuple[str, str]:
    row = page.locator(f"#rate-table tr[data-counter={name}]")
    return await row.locator(".rate").inner_text(), await row.locator(".total").inner_text()


async def wait_counter(page: Page, name: str, *, total: str, rate: str | None = None) -> None:
    """Until the counter's row shows `total` (and `rate` per second, when given)."""
    await page.wait_for_function(
        """([name, total, rate]) => {
             const row = document.querySelector(`#rate-table tr[data-counter=${name}]`);
             return row && row.querySelector('.total').textContent === total
               && (rate === null || row.querySelector('.rate').textContent === rate);
           }""",
        arg=[name, total, rate], timeout=WAIT_MS)


async def wait_lag(page: Page, total: int, partitions: dict[int, int]) -> None:
    await page.wait_for_function(
        """([total, parts]) => {
             const t = document.querySelector('#lag-summary [data-total-records]');
             const bars = [...document.querySelectorAll('#lag-bars .bar.records')];
             return t && Number(t.dataset.totalRecords) === total && bars.length === Object.keys(parts).length
               && bars.every(b => Number(b.dataset.value) === parts[b.dataset.partition]);
           }""",
        arg=[total, {str(k): v for k, v in partitions.items()}], timeout=WAIT_MS)


async def test_ops_view_shows_lag_rising_and_recovering(
    query_settings: Settings, browser: Browser, tmp_path: Path
) -> None:
    rng = random.Random(11)
    ingest = tally_process("ingest", query_settings, tmp_path).start()
    consumer = tally_process("consume", query_settings, tmp_path).start()
    targets = f"ingest=http://127.0.0.1:{ingest.port}/metrics,consumer=http://127.0.0.1:{consumer.port}/metrics"
    app_settings = query_settings.model_copy(update={"metrics_targets": targets})
    first = oracle.make_events(rng, 300, int(time.time() * 1000), span_ms=600_000)
    later = oracle.make_events(rng, 500, int(time.time() * 1000), span_ms=600_000)
    restarted: TallyProcess | None = None
    try:
        await post(ingest, first)
        await wait_for_total(str(query_settings.postgres_url), len(first))
        async with serve(create_app(app_settings)) as url:
            tab = await open_tab(browser)
            page = tab.page
            await page.goto(f"{url}/console/#/ops?refresh=1")
            partitions = query_settings.topic_partitions
            await wait_lag(page, 0, dict.fromkeys(range(partitions), 0))
            await wait_counter(page, "tally_consumer_events_applied_total", total=shown(len(first)))
            await wait_counter(page, "tally_ingest_events_accepted_total", rate="0", total=shown(len(first)))
            servers = ("postgres", "redis", "kafka")
            badges = [await page.inner_text(f"#health-list [data-check={c}] .badge") for c in servers]
            assert badges == ["up", "up", "up"]

            consumer.stop()
            await post(ingest, later)
            # Ingest's rate shows the batch (one poll's delta), and its total is exact.
            accepted = "#rate-table tr[data-counter=tally_ingest_events_accepted_total] .rate"
            await page.wait_for_function(
                "cell => Number(document.querySelector(cell).textContent.replace(/,/g, '')) > 0", arg=accepted,
                timeout=WAIT_MS)
            report = await api_json(f"{url}/v1/ops/lag")
            assert report["total_lag_records"] > 0
            expected = {p["partition"]: p["lag_records"] for p in report["partitions"]}
            await wait_lag(page, report["total_lag_records"], expected)
            _, total = await counter_row(page, "tally_ingest_events_accepted_total")
            assert total == shown(len(first) + len(later))
            note = await page.inner_text("#rate-note")
            assert note.startswith("Not answering: consumer (ConnectError); left out of the figures."), note
            await page.wait_for_timeout(1500)  # the seconds bars grow; the verdicts move off OK
            await page.screenshot(path=str(artifacts_dir() / "console-ops.png"), full_page=True)

            again = tmp_path / "consume-again.log"
            restarted = TallyProcess("consume", consumer.settings, consumer.port, again).start()  # the same port
            await wait_lag(page, 0, dict.fromkeys(range(partitions), 0))
            # The restarted consumer's own counter: exactly the events that waited for it.
            await wait_counter(page, "tally_consumer_events_applied_total", total=shown(len(later)))
            await wait_for_total(str(query_settings.postgres_url), len(first) + len(later))
            await page.set_viewport_size({"width": 390, "height": 844})
            await page.wait_for_timeout(300)
            assert await page.evaluate("document.documentElement.scrollWidth") <= 390
            await page.screenshot(path=str(artifacts_dir() / "console-ops-phone.png"), full_page=True)
            tab.assert_clean()
    finally:
        if restarted is not None:
            restarted.stop()
        consumer.stop()
        ingest.stop()


async def test_the_console_arithmetic(migrated: Settings, browser: Browser) -> None:
    """The page's pure helpers, run in the browser: number formatting, the chart's pivot and
    fill rules, and rates from two counter scrapes (restarts and targets that went away)."""
    async with serve(create_app(migrated)) as url:
        tab = await open_tab(browser)
        await tab.page.goto(f"{url}/console/")
        run = tab.page.evaluate
        assert await run("() => [0.1, 1234567.891, 12, -5, null, 1e21].map(tallyConsole.formatNumber)") == [
            "0.1", "1,234,567.891", "12", "-5", "—", "1,000,000,000,000,000,000,000"]
        assert await run("() => tallyConsole.formatBucket('2026-03-29T00:00:00+01:00')") == "2026-03-29 00:00 +01:00"
        rows = [{"bucket": "2026-01-01T00:00:00Z", "t": "a", "m": 3},
                {"bucket": "2026-01-01T01:00:00Z", "t": "b", "m": 4}]
        pivot = "([rows, merge]) => tallyConsole.pivot(rows, 't', 'm', ['a', 'b'], merge)"
        for merge, fill in (("sum", 0), ("min", None)):  # no row: nothing counted (0), or no minimum (a gap)
            assert await run(pivot, [rows, merge]) == {
                "xs": [1767225600, 1767229200], "keys": ["a", "b"], "columns": [[3, fill], [fill, 4]]}
        names = ["x_total", "y_total"]
        before = {"at": 100.0, "names": names, "sources": [
            {"name": "i1", "up": True, "counters": {"x_total": 50, "y_total": 10}},
            {"name": "i2", "up": True, "counters": {"x_total": 500, "y_total": 0}},
            {"name": "c1", "up": True, "counters": {"x_total": 0, "y_total": 7}}]}
        after = {"at": 102.0, "names": names, "sources": [
            {"name": "i1", "up": True, "counters": {"x_total": 70, "y_total": 10}},  # +20, +0
            {"name": "i2", "up": True, "counters": {"x_total": 30, "y_total": 4}},  # restarted: 30 new, 4 new
            {"name": "c1", "up": False, "counters": {}},  # gone: left out
            {"name": "new", "up": True, "counters": {"x_total": 1000, "y_total": 1000}}]}  # no earlier sample
        assert await run("([a, b]) => tallyConsole.rates(a, b)", [before, after]) == {"x_total": 25, "y_total": 2}
        assert await run("([a, b]) => tallyConsole.rates(a, b)", [None, after]) == {"x_total": None, "y_total": None}
        assert await run("([a]) => tallyConsole.rates(a, a)", [after]) == {"x_total": None, "y_total": None}
        assert await run("([a]) => tallyConsole.totals(a)", [after]) == {"x_total": 1100, "y_total": 1014}
        tab.assert_clean()
