"""Fixtures shared by the query integration tests."""

from __future__ import annotations

import pytest

from core.settings import Settings
from tests.integration.query_support import Row, insert_rows, make_rows


@pytest.fixture
async def loaded(migrated: Settings) -> tuple[Settings, list[Row]]:
    """A migrated database whose agg_events_by_type holds the known rows of `make_rows()`."""
    rows = make_rows()
    await insert_rows(migrated, rows)
    return migrated, rows
