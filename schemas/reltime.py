"""The one relative-time grammar, shared by the query API (`from=-24h`, `to=+5m`) and the
operator tools (`--since -1h`, `--from -7d`). Pure.

A relative time is a sign, 1 to 9 digits and a unit: `s`, `m`, `h`, `d` or `w` (seconds,
minutes, hours, days, weeks). No months or years: they have no fixed length. Nothing
around it (no spaces): callers that accept more (a `+` decoded to a space) say so.
"""

from __future__ import annotations

import re

SPELLING = "relative like -30s, -15m, -1h, -7d, -2w"  # for error messages and help texts
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3_600, "d": 86_400, "w": 604_800}
_RELATIVE = re.compile(r"([+-])([0-9]{1,9})([smhdw])")  # ASCII digits, matched whole (no "\n")


def relative_seconds(text: str) -> int | None:
    """`-1h` -> -3600, `+5m` -> 300; None when `text` is not a relative time."""
    match = _RELATIVE.fullmatch(text)
    if match is None:
        return None
    sign, amount, unit = match.groups()
    seconds = int(amount) * UNIT_SECONDS[unit]
    return -seconds if sign == "-" else seconds
