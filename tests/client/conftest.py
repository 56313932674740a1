"""tally_client is its own distributable (client/): importable here whether or not it is installed."""

from __future__ import annotations

import sys
from pathlib import Path

CLIENT_DIR = Path(__file__).parents[2] / "client"
try:
    import tally_client  # noqa: F401 - installed (pip install ./client)
except ImportError:
    sys.path.insert(0, str(CLIENT_DIR))
