"""The consumer's side of the rollup registry: apply exactly the rollups `tally migrate` registered.

A consumer learns the registry version when it starts and every offset update
requires it (consumers/sql.py). When a migrate changes the applied set, the next
batch is fenced, the consumer re-reads the registry here and either carries on
(its rollups file matches) or stops with `StaleRollups`: a consumer with an
older rollups file must not keep applying batches that skip a new rollup.

The same goes for a rollup's stored granularities (its coarse tables): the registry
records them apart from the fingerprint (schemas.rollups.definition says why), and a
consumer must store exactly those. One whose file lacks a registered granularity
would leave that table short of its batches (StaleRollups); one whose file names a
granularity not registered yet waits for `tally migrate` to create and fill it.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from schemas.rollups import RollupSpec, fingerprint, parse_stored_text

_READ = text(
    "SELECT (SELECT value FROM tally_meta WHERE key = 'rollups_version'), "
    "coalesce((SELECT json_object_agg(name, json_build_array(fingerprint, granularities)) "
    "FROM tally_rollups WHERE retired_at IS NULL), '{}')"
)


class StaleRollups(Exception):
    """This consumer's rollups file differs from the registry: it must be redeployed, not retried."""


class NotRegistered(Exception):
    """A rollup of this consumer's file is not registered yet: `tally migrate` has not run."""


async def registry_version(engine: AsyncEngine, specs: Sequence[RollupSpec]) -> int:
    """The registry version, once it lists exactly this consumer's rollups with the same definitions."""
    async with engine.connect() as conn:
        version, registered = (await conn.execute(_READ)).one()
    mine = {s.name: s for s in specs}
    if version is None or any(n not in registered for n in mine):
        raise NotRegistered("rollups are not registered yet: run `tally migrate`")
    extra = sorted(set(registered) - set(mine))
    differ = sorted(n for n, s in mine.items() if registered[n][0] != fingerprint(s))
    stored = {n: parse_stored_text(registered[n][1], s.granularity) for n, s in mine.items() if n not in differ}
    fewer = [f"{n} {g}" for n, gs in sorted(stored.items()) for g in gs if g not in mine[n].granularities]
    if extra or differ or fewer:
        raise StaleRollups(
            "this consumer's rollups file does not match the registry"
            + (f"; it lacks {', '.join(extra)}" if extra else "")
            + (f"; it defines {', '.join(differ)} differently" if differ else "")
            + (f"; it does not store {', '.join(fewer)}" if fewer else "")
            + ": deploy the rollups file `tally migrate` was run with"
        )
    more = [f"{n} {g}" for n, gs in sorted(stored.items()) for g in mine[n].granularities if g not in gs]
    if more:
        raise NotRegistered(f"the tables of {', '.join(more)} are not registered yet: run `tally migrate`")
    return int(version)
