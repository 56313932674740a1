"""Refuse requests whose headers are too large, before any route or dependency runs.

uvicorn's httptools parser puts no bound on header size (h11 bounds only what arrives
in pieces), so a 100 KiB `Cookie` would reach the app and every dependency that parses
headers. The proxy in front (nginx: 8 KiB per line) normally refuses these first; this
keeps the answer the same, a 431 problem, when ingest is reached directly.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from core.problems import problem_response


class HeaderLimit:
    """A pure ASGI middleware: a 431 problem+json when the headers total more than `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            # Counted as sent: "name: value\r\n" per header.
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.max_bytes:
                response = problem_response(
                    431,
                    "Request header fields too large",
                    f"the request headers total {size} bytes; the limit is {self.max_bytes} (TALLY_MAX_HEADER_BYTES)",
                    slug="header-too-large",
                    instance=scope["path"],
                    headers={"Connection": "close"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
