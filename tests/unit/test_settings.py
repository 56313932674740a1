"""Settings that contradict each other are refused at start-up, naming both variables."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_a_default_page_above_the_maximum_is_refused() -> None:
    assert Settings(env="test", default_limit=10_000, max_limit=10_000).default_limit == 10_000
    with pytest.raises(ValidationError, match=r"TALLY_DEFAULT_LIMIT \(10001\) is above TALLY_MAX_LIMIT \(10000\)"):
        Settings(env="test", default_limit=10_001, max_limit=10_000)
