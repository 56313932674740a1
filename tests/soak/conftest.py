"""The soak's marker, registered here so `--strict-markers` accepts it without touching pyproject."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "soak: the whole pipeline under steady mixed traffic for TALLY_SOAK_SECONDS (60 s by default)"
    )
