"""What the aggregation reads of an event: a struct holding only the fields the rollups use.

Ingest writes whole events; a consumer needs `type`, `ts`, the short fields and the
few `properties` keys its rollups name. msgspec decodes an envelope straight into
these structs, skipping every other key in C, and checks on the way every rule of
`consumers.validate.check_event` (type pattern, integer `ts` in years 1..9999,
strings or null for the short fields and `event_id`, an object for `properties`):
the types carry the rules. A record that does not decode this way (a foreign
producer, an invalid event, an odd spelling such as `"v": 1.0`) is read the general
way, `decode` then `validate`, which decides and names every refusal; its good
events are then converted to the same structs. So the fast way only ever accepts
what the general way accepts, and gives the same values (tests/unit/test_view.py
holds it to that).

Struct attributes of `properties` keys are the keys' hex spelling (`k` + hex), so
any key is a safe attribute name and a plan can compute it from its own paths.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Final, Literal, cast

import msgspec

from consumers.decode import DeadLetter, Record, decode
from consumers.validate import MAX_TS_MS, MIN_TS_MS, validate
from schemas.events import TYPE_PATTERN

# check_event's `fullmatch`: msgspec searches, and `$` would let a trailing newline through.
_TYPE: Final = "^(?:" + TYPE_PATTERN.pattern.removeprefix("^").removesuffix("$") + r")\Z"


class View(msgspec.Struct, gc=False):
    """The fields every rollup may read (the short fields, because validation reads them)."""

    type: Annotated[str, msgspec.Meta(pattern=_TYPE)]
    ts: Annotated[int, msgspec.Meta(ge=MIN_TS_MS, le=MAX_TS_MS)]
    event_id: str | None = None
    source: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    properties: Any = None  # a `Props` struct of the view type, or None


def attribute(key: str) -> str:
    """The struct attribute holding `properties[key]`."""
    return "k" + key.encode().hex()


@functools.lru_cache(maxsize=32)
def view_type(keys: frozenset[str]) -> type[View]:
    """The view struct for events whose `properties` keys `keys` are read (cached per key set)."""
    props = msgspec.defstruct(
        "Props",
        [(attribute(k), Any, None) for k in sorted(keys)],
        rename={attribute(k): k for k in keys},
        gc=False,
    )
    view = cast(
        type[View], msgspec.defstruct("EventView", [("properties", props | None, None)], bases=(View,), gc=False)
    )
    _NO_PROPERTIES[view] = props()
    return view


# Per view type: its `properties` struct with every key absent, read where an event has none.
_NO_PROPERTIES: dict[type[View], msgspec.Struct] = {}


def no_properties(view: type[View]) -> msgspec.Struct:
    """What an event of this view type without `properties` (absent or null) is read as."""
    return _NO_PROPERTIES[view]


def keys_of(paths: Iterable[Sequence[str]]) -> frozenset[str]:
    """The first-level `properties` keys that `paths` (split dotted paths) read."""
    return frozenset(p[1] for p in paths if len(p) >= 2 and p[0] == "properties")


@functools.lru_cache(maxsize=32)
def reader(keys: frozenset[str]) -> Reader:
    """The Reader of one key set, built once (building its decoder costs more than a record)."""
    return Reader(keys)


class Reader:
    """Kafka records -> views and dead letters, for one set of property keys."""

    def __init__(self, keys: frozenset[str]) -> None:
        self.view = view_type(keys)
        self._list: Any = list[self.view]  # type: ignore[name-defined]
        self._envelope = msgspec.defstruct("Envelope", [("v", Literal[1]), ("events", self._list)], gc=False)
        self._decoder: Final = msgspec.json.Decoder(self._envelope)

    def read(self, record: Record) -> tuple[list[View], list[DeadLetter]]:
        """The record's events as views, and the dead letters of what could not be read."""
        value = record.value
        if value is not None:
            try:
                return self._decoder.decode(value).events, []  # type: ignore[attr-defined]
            except msgspec.DecodeError:  # ValidationError is one: anything odd goes the general way
                pass
        raw, dead = decode(record)
        if dead is not None:
            return [], [dead]
        good, bad = validate(record, raw)
        return self.views(good), bad

    def views(self, events: Sequence[dict[str, Any]]) -> list[View]:
        """Validated event dicts as views (the general way's good events, tests' events)."""
        return msgspec.convert(events, self._list)  # type: ignore[no-any-return]
