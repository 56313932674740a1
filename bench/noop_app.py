"""A benchmark baseline, not product code: the no-op ingest endpoint.

The same server stack as `tally ingest` (FastAPI on the same server, started by the same
core.servers.serve: uvicorn or Granian, uvloop, access log off, the same worker count),
receiving the same bodies at the same path and answering 202 without doing anything with
them. Its request rate is what the stack itself allows on this machine: the ceiling any
endpoint on it can reach.

    .venv/bin/python -m bench.noop_app --port 8100 [--workers 2] [--server granian]
"""

from __future__ import annotations

import argparse

from fastapi import FastAPI, Request
from starlette.responses import Response

app = FastAPI(title="no-op ingest (benchmark baseline)")
ACCEPTED = b'{"accepted":0,"rejected":[]}'


@app.post("/v1/events", status_code=202)
async def post_events(request: Request) -> Response:
    await request.body()  # receive the body, as any endpoint must
    return Response(ACCEPTED, status_code=202, media_type="application/json")


@app.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


def serve(app_path: str) -> None:
    """Serve `app_path` as `tally ingest` serves its app (core.servers.serve, with the same settings
    but for the log level and the drain: a benchmark's server stops at once)."""
    from core import servers
    from core.settings import Settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--server", choices=servers.SERVERS, default=servers.DEFAULT_SERVER)
    args = parser.parse_args()
    settings = Settings(env="test", server=args.server, log_level="warning", drain_seconds=0)
    servers.serve(app_path, settings, port=args.port, workers=args.workers, factory=False)


if __name__ == "__main__":
    serve("bench.noop_app:app")
