"""What `tally migrate` may do to the rollup registry, decided without I/O.

The registry (`tally_rollups`) records the definition each `agg_*` table was made
for. A new rollup is added; one that left the rollups file is retired (its table
kept, no longer applied); one whose definition changed is refused, because its
table's rows were counted under the old definition and mixing the two would
make every number wrong. A changed rollup gets a new name, so a new table, and
`tally backfill` fills its past.

A rollup's stored granularities (its coarse tables, `agg_<name>__hour`...) are
recorded apart from its definition: the base table's rows do not depend on them. A
granularity added to a registered rollup gets its table filled from the base table
by `tally migrate` (core.coarse); one removed keeps its table, no longer written,
as a retired rollup does (a later re-add rebuilds it from the base). Either way the
applied set changed, so `rollups_version` moves and consumers started with the old
file are fenced: one of them would not write the new table, which would then drift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from schemas.rollups import RollupSpec, fingerprint


class RollupChanged(ValueError):
    """A rollup's definition differs from the one its table was created with."""


@dataclass(frozen=True, slots=True)
class RegisteredRollup:
    name: str
    fingerprint: str
    retired: bool
    granularities: tuple[str, ...] = ()  # stored ones as registered; () for rows older than coarse tables


@dataclass
class RegistryPlan:
    add: list[RollupSpec] = field(default_factory=list)
    revive: list[str] = field(default_factory=list)
    retire: list[str] = field(default_factory=list)
    # Registered rollups whose stored granularities change: the registry row is rewritten.
    regranulate: list[RollupSpec] = field(default_factory=list)
    # Coarse tables to (re)build from the base table, per rollup: added ones, and all of a new rollup's.
    fill: list[tuple[RollupSpec, tuple[str, ...]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # `<rollup> <granularity>` no longer stored (tables kept)

    @property
    def changed(self) -> bool:
        return bool(self.add or self.revive or self.retire or self.regranulate)


def plan_registry(registered: Mapping[str, RegisteredRollup], specs: Sequence[RollupSpec]) -> RegistryPlan:
    plan = RegistryPlan()
    changed = [s.name for s in specs if s.name in registered and registered[s.name].fingerprint != fingerprint(s)]
    if changed:
        names = ", ".join(changed)
        raise RollupChanged(
            f"the definition of rollup(s) {names} changed since their tables were created. A table keeps the "
            "rows of the definition it was made for, so give the changed rollup a new name (e.g. "
            f"{changed[0]}_v2), run `tally migrate`, then `tally backfill {changed[0]}_v2 --from ...` to fill "
            "its past; drop the old table when nothing reads it any more."
        )
    wanted = {s.name for s in specs}
    for spec in specs:
        row = registered.get(spec.name)
        if row is None:
            plan.add.append(spec)
            if spec.coarse_granularities:  # an adopted base table may hold rows already
                plan.fill.append((spec, spec.coarse_granularities))
            continue
        if row.retired:
            plan.revive.append(spec.name)
        stored = row.granularities or (spec.granularity,)
        if stored != spec.granularities:
            plan.regranulate.append(spec)
            added = tuple(g for g in spec.coarse_granularities if g not in stored)
            if added:
                plan.fill.append((spec, added))
            plan.dropped += [f"{spec.name} {g}" for g in stored if g not in spec.granularities]
    plan.retire = sorted(n for n, row in registered.items() if not row.retired and n not in wanted)
    return plan
