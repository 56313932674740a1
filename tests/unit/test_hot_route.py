"""core.http.HotRoute: which requests go straight to the endpoint, and which to the framework."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.types import Receive, Scope, Send

from core.http import HotRoute

Seen = list[tuple[str, dict[str, Any] | None]]


def app_pair() -> tuple[HotRoute, Seen]:
    seen: Seen = []

    async def framework(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(("framework", None))

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(("endpoint", scope.get("path_params")))

    return HotRoute(framework, path="/v1/rollups/{name}", methods=frozenset({"GET", "HEAD"}), endpoint=endpoint), seen


async def call(hot: HotRoute, method: str, path: str, root_path: str = "", kind: str = "http") -> None:
    async def receive() -> dict[str, Any]:
        return {}

    async def send(message: dict[str, Any]) -> None:
        return None

    await hot({"type": kind, "method": method, "path": path, "root_path": root_path}, receive, send)


@pytest.mark.parametrize(
    ("method", "path", "root_path", "expected"),
    [
        ("GET", "/v1/rollups/events_by_type", "", ("endpoint", {"name": "events_by_type"})),
        ("HEAD", "/v1/rollups/x", "", ("endpoint", {"name": "x"})),
        ("GET", "/api/v1/rollups/x", "/api", ("endpoint", {"name": "x"})),
        ("POST", "/v1/rollups/x", "", ("framework", None)),  # the mounted route answers 405
        ("GET", "/v1/rollups/", "", ("framework", None)),  # no name: not this route
        ("GET", "/v1/rollups", "", ("framework", None)),
        ("GET", "/v1/rollups/a/b", "", ("framework", None)),
        ("GET", "/v1/rollupsx/a", "", ("framework", None)),
        ("GET", "/other", "", ("framework", None)),
    ],
)
async def test_routing(method: str, path: str, root_path: str, expected: tuple[str, Any]) -> None:
    hot, seen = app_pair()
    await call(hot, method, path, root_path)
    assert seen == [expected]


async def test_lifespan_and_websockets_go_to_the_framework() -> None:
    hot, seen = app_pair()
    await call(hot, "GET", "/v1/rollups/x", kind="lifespan")
    assert seen == [("framework", None)]


async def test_an_exact_path() -> None:
    seen: Seen = []

    async def framework(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(("framework", None))

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(("endpoint", scope.get("path_params")))

    hot = HotRoute(framework, path="/v1/events", methods=frozenset({"POST"}), endpoint=endpoint)
    await call(hot, "POST", "/v1/events")
    await call(hot, "POST", "/v1/events/x")
    assert seen == [("endpoint", None), ("framework", None)]
