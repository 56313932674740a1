"""DESIGN §1's import rule, checked on every module: schemas imports nothing of ours,
core only schemas, each service only core and schemas, so each can be deployed alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
OURS = {"core", "schemas", "ingest", "consumers", "query"}
ALLOWED = {
    "schemas": {"schemas"},
    "core": {"core", "schemas"},
    "ingest": {"ingest", "core", "schemas"},
    "consumers": {"consumers", "core", "schemas"},
    "query": {"query", "core", "schemas"},
}


def imported_packages(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & OURS


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_import_rule(package: str) -> None:
    offences = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) - ALLOWED[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {k: v for k, v in offences.items() if v} == {}
