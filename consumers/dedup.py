"""De-duplication by `event_id`, the pure half: which events of a batch count, and the time rules.

With `TALLY_DEDUP` on, an event whose `event_id` was already counted (in an
earlier batch within the window, or earlier in the same batch) is not counted
again. Ingest gives every event an id (a random UUID, or one derived from the
`Idempotency-Key` and the event's index), so only real retries are dropped. The
Postgres half, and the argument for why it is exact, is `consumers.dedup_store`.

Keys are canonical lowercase UUID text. Ingest writes exactly that; an id from
another producer that is a UUID in another spelling is canonicalised, and one that
is not a UUID at all is mapped to a UUIDv5 of its text, so it still de-duplicates
instead of failing the cast in Postgres and wedging the partition. Events without
an id are always counted. Pure: no I/O, no clock reads.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from operator import attrgetter
from typing import Any, Final

# In the first MARGIN of a UTC day, ids are claimed in yesterday's partition as well as today's.
MARGIN: Final = timedelta(minutes=30)
# A transaction that began before a UTC midnight must commit before midnight + COMMIT_DEADLINE
# (or it rolls back and is retried): the half of MARGIN left over is the allowance for the COMMIT itself.
COMMIT_DEADLINE: Final = MARGIN / 2
PARTITION_PREFIX: Final = "tally_seen_events_p"
_CANONICAL: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_EVENT_ID: Final = attrgetter("event_id")
_FOREIGN_IDS: Final = uuid.UUID("5f0c1f1e-7a11-4d3e-9a5b-2c6f0e8d4b71")  # namespace for ids that are not UUIDs


def dedup_key(event_id: Any) -> str | None:
    """The event's id as canonical UUID text, or None when it has none (then it always counts)."""
    if type(event_id) is not str:
        return None
    if _CANONICAL.fullmatch(event_id):
        return event_id
    try:
        return str(uuid.UUID(event_id))
    except ValueError:
        return str(uuid.uuid5(_FOREIGN_IDS, event_id))


@dataclass(slots=True)
class Candidates:
    """A batch's events as candidates for counting: each one's key, and the distinct keys in order."""

    events: list[Any]  # views (consumers.view), read by `event_id`
    keys: list[str | None] = field(default_factory=list)
    distinct: list[str] = field(default_factory=list)
    repeats: bool = False  # some key occurs twice in this batch

    @classmethod
    def of(cls, events: list[Any]) -> Candidates:
        ids = list(map(_EVENT_ID, events))
        # Ingest's ids are canonical already: one C pass checks them all.
        canonical = None not in ids and all(map(_CANONICAL.fullmatch, ids))
        keys = ids if canonical else [dedup_key(i) for i in ids]
        distinct = list(dict.fromkeys(k for k in keys if k is not None))
        keyed = len(keys) - keys.count(None)
        return cls(events, keys, distinct, repeats=len(distinct) < keyed)

    def joined(self, later: Candidates) -> Candidates:
        """These candidates followed by `later`'s, as if `of` had seen all the events at once."""
        keys = self.keys + later.keys
        distinct = list(dict.fromkeys(self.distinct + later.distinct))
        keyed = len(keys) - keys.count(None)
        return Candidates(self.events + later.events, keys, distinct, repeats=len(distinct) < keyed)


def counted(candidates: Candidates, seen: Iterable[str]) -> list[Any]:
    """The events to count: those without a key, and the first occurrence of each key not in `seen`."""
    skip = set(seen)
    out: list[Any] = []
    for event, key in zip(candidates.events, candidates.keys, strict=True):
        if key is None:
            out.append(event)
        elif key not in skip:
            skip.add(key)
            out.append(event)
    return out


def window_days(hours: int) -> int:
    """Whole UTC days before today that are checked: today plus these cover at least `hours`."""
    return max(1, math.ceil(hours / 24))


def near_midnight(at: datetime) -> bool:
    """True in the first MARGIN of a UTC day, when ids are claimed in yesterday's partition as well."""
    utc = at.astimezone(UTC)
    return utc - datetime.combine(utc.date(), time(0), UTC) < MARGIN


def commit_too_late(started_at: datetime, elapsed_seconds: float) -> bool:
    """True if a transaction that began at `started_at` (database clock) and has run for at least
    `elapsed_seconds` could commit later than COMMIT_DEADLINE after the next UTC midnight."""
    utc = started_at.astimezone(UTC)
    midnight = datetime.combine(utc.date() + timedelta(days=1), time(0), UTC)
    return utc + timedelta(seconds=elapsed_seconds) >= midnight + COMMIT_DEADLINE


def partition_name(day: date) -> str:
    return f"{PARTITION_PREFIX}{day:%Y%m%d}"


def partition_day(name: str) -> date | None:
    """The day a partition named by `partition_name` holds; None for any other name."""
    if not name.startswith(PARTITION_PREFIX):
        return None
    try:
        return datetime.strptime(name[len(PARTITION_PREFIX) :], "%Y%m%d").replace(tzinfo=UTC).date()
    except ValueError:
        return None


def days_to_create(today: date, ahead: int) -> list[date]:
    """Partitions a claim may insert into: yesterday (in the first MARGIN of a day), today, and
    `ahead` days after, so that a missed maintenance run is not yet a failed flush."""
    return [today + timedelta(days=d) for d in range(-1, ahead + 1)]


def expired(days: Sequence[date], today: date, hours: int) -> list[date]:
    """Days whose partitions are older than every day the claim still checks."""
    oldest = today - timedelta(days=window_days(hours))
    return sorted(d for d in days if d < oldest)
