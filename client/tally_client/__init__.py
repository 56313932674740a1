"""Tally's producer SDK: `Client` (threads) and `AsyncClient` (asyncio).

    from tally_client import Client
    with Client("http://localhost:8000", api_key=None) as tally:
        tally.capture("purchase", source="web", user_id="u1", properties={"amount": 9.99})
        tally.flush(timeout=5)

Standard library only; imports nothing of Tally's server.
"""

from __future__ import annotations

__version__ = "0.1.0"

from tally_client._async import AsyncClient
from tally_client._options import ClientClosed, Options, QueueFull, Stats
from tally_client._sync import Client

__all__ = ["AsyncClient", "Client", "ClientClosed", "Options", "QueueFull", "Stats", "__version__"]
