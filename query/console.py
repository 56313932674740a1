"""The console: a small web page served from the query service, with no build step.

It is static files (`query/console/`: HTML, one script, one stylesheet, uPlot vendored
under `vendor/`) that call the public API from the browser with the user's own key,
so the page itself is public and shows nothing until the API answers. Nothing is
loaded from another origin: its policy allows this origin's scripts, styles and API only.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from core.http import Pages, page_headers

CONSOLE_DIR = Path(__file__).with_name("console")
CONSOLE_PATH = "/console"
# uPlot sizes its elements through the CSSOM (element.style), which style-src does not govern;
# the legend's colour swatches are the same. No inline script, no eval, no other origin.
CONSOLE_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
CONSOLE_PAGES: Pages = ((CONSOLE_PATH, page_headers(CONSOLE_CSP)),)


def mount_console(app: FastAPI) -> None:
    """Serve the console at /console/ (Starlette redirects /console there)."""
    app.mount(CONSOLE_PATH, StaticFiles(directory=CONSOLE_DIR, html=True), name="console")
