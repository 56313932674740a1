"""Step 1: Kafka records -> events. A record that is not a readable envelope becomes a dead letter.

Pure: works on anything shaped like an aiokafka ConsumerRecord. The dead letter
keeps the record's key, value and headers as they were, so nothing about the
original is lost, and adds where it came from and why it was refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from schemas.envelope import ERROR_HEADER, EnvelopeError, unpack

SOURCE_TOPIC_HEADER = "tally-source-topic"
SOURCE_PARTITION_HEADER = "tally-source-partition"
SOURCE_OFFSET_HEADER = "tally-source-offset"
REPLAY_HEADER = "tally-replay-of"  # `<dlq topic>/<partition>/<offset>` on a record `tally dlq replay` re-submitted
_OUR_HEADERS = frozenset({ERROR_HEADER, SOURCE_TOPIC_HEADER, SOURCE_PARTITION_HEADER, SOURCE_OFFSET_HEADER})
MAX_ERROR_CHARS = 1000
UNDECODABLE = "undecodable"  # the metric reason for records that are not envelopes


class Record(Protocol):
    """The parts of an aiokafka ConsumerRecord the pure steps read."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record for the DLQ topic. `reason` is a short metric label; the header carries the detail."""

    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    reason: str


def dead_letter(
    record: Record, value: bytes | None, reason: str, error: str, headers: Sequence[tuple[str, bytes]] | None = None
) -> DeadLetter:
    """A dead letter for `record` (or for one event of it, when `value` is a new envelope)."""
    kept = [(k, v) for k, v in (record.headers if headers is None else headers) if k not in _OUR_HEADERS]
    kept += [
        (ERROR_HEADER, error[:MAX_ERROR_CHARS].encode()),
        (SOURCE_TOPIC_HEADER, record.topic.encode()),
        (SOURCE_PARTITION_HEADER, str(record.partition).encode()),
        (SOURCE_OFFSET_HEADER, str(record.offset).encode()),
    ]
    return DeadLetter(key=record.key, value=value, headers=tuple(kept), reason=reason)


def decode(record: Record) -> tuple[list[Any], DeadLetter | None]:
    """The record's raw events, or no events and the dead letter that replaces the record."""
    try:
        return unpack(record.value), None
    except EnvelopeError as exc:
        return [], dead_letter(record, record.value, UNDECODABLE, str(exc))
