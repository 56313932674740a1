"""Clients cannot grow /metrics: request series are labelled by route template and a fixed set of methods.

Any token is a valid HTTP method (h11 passes them all to the app; httptools some forty),
so a method label spelled by the client would be one new series per spelling. Paths
that match no route are one `unmatched` series, not one per path.
"""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import REGISTRY

from core.settings import Settings
from query.app import create_app
from tests.conftest import serve

pytestmark = pytest.mark.integration

ODD_METHODS = ("PROPFIND", "MKCOL", "PURGE", "REPORT", "SEARCH", "COPY", "MOVE", "LOCK", "UNLOCK", "TRACE")


def series(service: str) -> dict[tuple[str, str, str], float]:
    """(route, method, status) -> count of tally_http_requests_total for `service`."""
    out = {}
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == "tally_http_requests_total" and sample.labels.get("service") == service:
                out[(sample.labels["route"], sample.labels["method"], sample.labels["status"])] = sample.value
    return out


async def test_odd_methods_and_paths_share_bounded_series(migrated: Settings) -> None:
    before = series("query")
    async with serve(create_app(migrated)) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        statuses = [(await http.request(method, "/healthz")).status_code for method in ODD_METHODS]
        missing = [(await http.get(f"/no/such/path/{i}")).status_code for i in range(20)]
        exposed = (await http.get("/metrics")).text
    assert statuses == [405] * len(ODD_METHODS) and missing == [404] * 20
    after = series("query")
    grown = {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}
    odd = {key: n for key, n in grown.items() if key[1] == "other"}
    assert sum(odd.values()) == len(ODD_METHODS) and {key[2] for key in odd} == {"405"}
    assert grown[("unmatched", "GET", "404")] == 20
    for method in ODD_METHODS:
        assert f'method="{method}"' not in exposed
    assert "/no/such/path" not in exposed
