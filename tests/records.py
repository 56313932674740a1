"""What the consumer's pure steps read, made by hand: Kafka records, and events as views."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from consumers.aggregate import RollupPlan, plan_keys
from consumers.view import View, reader


@dataclass
class Rec:
    """The parts of an aiokafka ConsumerRecord that consumers.decode.Record names."""

    offset: int
    value: bytes | None
    topic: str = "events"
    partition: int = 0
    timestamp: int = 0
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=lambda: [("tally-request-id", b"req-1")])


def views(plans: Sequence[RollupPlan], events: Sequence[dict[str, Any]]) -> list[View]:
    """Validated event dicts as the views the plans' aggregation reads."""
    return reader(plan_keys(plans)).views(events)
