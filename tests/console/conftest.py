"""The console in a real browser: Debian's chromium driven by Playwright (no browser download).

`make browser` (which `make test` runs) installs chromium; TALLY_CHROMIUM names another build.
Each page records its script errors and console errors (a CSP violation is one), and the
tests assert there were none. Screenshots go to TALLY_TEST_ARTIFACTS (default
build/test-artifacts) under console/; `make screenshots` copies them into docs/img.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

ROOT = Path(__file__).resolve().parents[2]


def chromium_path() -> str:
    path = os.environ.get("TALLY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("no chromium: `make browser` installs Debian's package (or set TALLY_CHROMIUM)")
    return path


def artifacts_dir() -> Path:
    out = Path(os.environ.get("TALLY_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts")) / "console"
    out.mkdir(parents=True, exist_ok=True)
    return out


@dataclass
class Tab:
    page: Page
    problems: list[str] = field(default_factory=list)  # script errors and console errors, in order

    def assert_clean(self, *expected: str) -> None:
        """No problem but those containing one of `expected` (e.g. the browser's log of a 401)."""
        unexpected = [p for p in self.problems if not any(e in p for e in expected)]
        assert unexpected == [], unexpected


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        launched = await p.chromium.launch(executable_path=chromium_path())
        try:
            yield launched
        finally:
            await launched.close()


async def open_tab(browser: Browser, *, width: int = 1280, height: int = 800) -> Tab:
    # en-US and UTC fix the number and time formats the assertions spell out.
    context = await browser.new_context(viewport={"width": width, "height": height}, locale="en-US", timezone_id="UTC")
    tab = Tab(await context.new_page())
    tab.page.on("pageerror", lambda exc: tab.problems.append(f"pageerror: {exc}"))
    tab.page.on("console", lambda m: tab.problems.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    return tab
