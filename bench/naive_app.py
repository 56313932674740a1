"""A benchmark baseline, not product code: the straightforward ingest endpoint.

What one would write first with FastAPI, pydantic and aiokafka: the body declared as a
pydantic model of the batch (FastAPI parses and validates it), then one Kafka record per
event, all sends gathered and awaited with acks=all before the 202 (a 202 still means
durable). aiokafka's defaults otherwise. Issue 7's target: Tally's ingest at least 5x
this endpoint's events/s (one worker, 100 events/request).

    BENCH_KAFKA=127.0.0.1:9092 BENCH_TOPIC=bench.naive .venv/bin/python -m bench.naive_app --port 8101
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiokafka import AIOKafkaProducer
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from bench.noop_app import serve

TOPIC = os.environ.get("BENCH_TOPIC", "bench.naive")


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    event_id: uuid.UUID | None = None
    ts: int | None = None
    source: str | None = Field(default=None, max_length=256)
    user_id: str | None = Field(default=None, max_length=256)
    session_id: str | None = Field(default=None, max_length=256)
    properties: dict[str, Any] = Field(default_factory=dict)
    received_at: int | None = None


class Batch(BaseModel):
    events: list[Event] = Field(min_length=1, max_length=10_000)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    producer = AIOKafkaProducer(bootstrap_servers=os.environ["BENCH_KAFKA"], acks="all")
    await producer.start()
    app.state.producer = producer
    try:
        yield
    finally:
        await producer.stop()


app = FastAPI(title="straightforward ingest (benchmark baseline)", lifespan=lifespan)


@app.post("/v1/events", status_code=202)
async def post_events(batch: Batch) -> dict[str, int]:
    producer: AIOKafkaProducer = app.state.producer
    received_at = int(time.time() * 1000)
    sends = []
    for event in batch.events:
        event.event_id = event.event_id or uuid.uuid4()
        event.ts = event.ts or received_at
        event.received_at = received_at
        sends.append(await producer.send(TOPIC, event.model_dump_json(exclude_none=True).encode()))
    await asyncio.gather(*sends)  # every record acknowledged (acks=all) before the 202
    return {"accepted": len(sends)}


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    serve("bench.naive_app:app")
