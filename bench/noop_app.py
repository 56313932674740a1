"""A benchmark baseline, not product code: the no-op ingest endpoint.

The same server stack as `tally ingest` (FastAPI on uvicorn with uvloop and httptools,
access log off, the same worker count), receiving the same bodies at the same path and
answering 202 without doing anything with them. Its request rate is what the stack
itself allows on this machine: the ceiling any endpoint on it can reach.

    .venv/bin/python -m bench.noop_app --port 8100 [--workers 2]
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
    """Serve `app_path` as `tally ingest` serves its app (core.cli._serve)."""
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    uvicorn.run(app_path, host="127.0.0.1", port=args.port, workers=args.workers, log_level="warning",
                loop="uvloop", http="httptools", access_log=False)


if __name__ == "__main__":
    serve("bench.noop_app:app")
