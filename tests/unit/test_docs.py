"""The README is the operator's manual: every setting is documented there."""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    missing = [f"TALLY_{name.upper()}" for name in Settings.model_fields if f"`TALLY_{name.upper()}`" not in README]
    assert missing == []


def test_the_two_commands_are_given() -> None:
    assert "make dev" in README and "make test" in README
