"""tally_client imports nothing of Tally's server, nor its dependencies."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.client.conftest import CLIENT_DIR

FORBIDDEN = {
    "fastapi",
    "starlette",
    "sqlalchemy",
    "aiokafka",
    "asyncpg",
    "redis",
    "httpx",
    "pydantic",
    "msgspec",
    "orjson",
    "core",
    "schemas",
    "ingest",
    "consumers",
    "query",
    "cli",
}

PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import tally_client
from tally_client import AsyncClient, Client, Options
# Exercise the code paths too (an import inside a function would only show up here).
c = Client("http://127.0.0.1:9", options=Options(shutdown_timeout=0.0, max_retries=0))
c.capture("probe", properties={"a": 1})
c.close(timeout=0.0)
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))
"""


def test_no_server_imports() -> None:
    out = subprocess.run(
        [sys.executable, "-I", "-c", PROBE, str(CLIENT_DIR)], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(json.loads(out.stdout.splitlines()[-1]))
    assert "tally_client" in loaded
    assert loaded & FORBIDDEN == set()


def test_pyproject_declares_no_dependencies() -> None:
    import tomllib

    project = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == []
    assert project["requires-python"] == ">=3.11"
    assert (CLIENT_DIR / "tally_client" / "py.typed").exists()
