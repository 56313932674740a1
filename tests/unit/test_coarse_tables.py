"""Coarse tables, the pure parts: declaring granularities, naming tables, planning migrations,
and deriving a batch's coarse cells from its base cells."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers.aggregate import Cells, coarse_cells, compile_rollup, table_cells
from consumers.sql import upserts
from core.coarse import fill_statements
from core.registry import RegisteredRollup, plan_registry
from schemas.rollups import (
    RollupSpec,
    RollupSpecError,
    fingerprint,
    parse_rollup,
    parse_rollups,
    parse_stored_text,
    stored_text,
)
from schemas.tables import build_metadata

MEASURES = ["count", "sum:properties.a", "min:properties.a", "max:properties.a"]
BASE: dict[str, Any] = {"name": "x", "dimensions": ["type"], "measures": MEASURES}


def spec(**extra: Any) -> RollupSpec:
    return parse_rollup({**BASE, **extra})


def test_granularities_ascend_from_the_base_which_is_the_finest() -> None:
    s = spec(granularities=["day", "minute", "hour"])
    assert (s.granularity, s.granularities, s.coarse_granularities) == ("minute", ("minute", "hour", "day"),
                                                                        ("hour", "day"))
    assert spec(granularities=["hour", "day"]).granularity == "hour"
    assert spec(granularity="hour", granularities=["day", "hour"]).granularities == ("hour", "day")
    assert spec().granularities == ("minute",)  # absent: the base alone
    assert spec(granularity="day").granularities == ("day",)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"granularity": "hour", "granularities": ["minute", "hour"]}, "granularity = 'hour' conflicts"),
        ({"granularities": ["minute", "week"]}, "'week'.* are not stored granularities"),
        ({"granularities": ["hour", "hour"]}, "repeat"),
        ({"granularities": []}, "non-empty list"),
        ({"granularities": "hour"}, "non-empty list"),
    ],
)
def test_bad_granularities_are_refused_with_the_reason(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(RollupSpecError, match=message):
        spec(**extra)


def test_a_spec_built_by_hand_must_list_its_base_first() -> None:
    s = spec()
    with pytest.raises(RollupSpecError, match="ascend from the base"):
        RollupSpec("x", "minute", s.dimensions, s.measures, granularities=("hour", "minute"))


def test_tables_are_named_per_granularity_and_collisions_are_refused() -> None:
    s = spec(granularities=["minute", "hour", "day"])
    assert s.table_for("minute") == s.table == "agg_x"
    assert s.table_for("hour") == "agg_x__hour"
    assert s.tables == ("agg_x", "agg_x__hour", "agg_x__day")
    with pytest.raises(KeyError):
        spec().table_for("hour")
    both = {"rollup": [{**BASE, "granularities": ["minute", "hour"]}, {**BASE, "name": "x__hour"}]}
    with pytest.raises(RollupSpecError, match="agg_x__hour would belong to rollups 'x' and 'x__hour'"):
        parse_rollups(both)
    assert len(parse_rollups({"rollup": [{**BASE}, {**BASE, "name": "x__hour"}]})) == 2  # no hour table: fine


def test_granularities_leave_the_fingerprint_and_are_registered_apart() -> None:
    assert fingerprint(spec()) == fingerprint(spec(granularities=["minute", "hour", "day"]))
    assert fingerprint(spec()) != fingerprint(spec(granularity="hour"))
    assert stored_text(spec(granularities=["day", "minute"])) == "minute,day"
    assert parse_stored_text("minute,day", "minute") == ("minute", "day")
    assert parse_stored_text(None, "hour") == ("hour",)


def test_each_stored_granularity_is_a_table_with_the_same_columns_keys_and_own_index_names() -> None:
    s = spec(granularities=["minute", "hour", "day"])
    tables = build_metadata([s]).tables
    for t in s.tables:
        assert [c.name for c in tables[t].columns] == [c.name for c in tables["agg_x"].columns]
        assert [c.name for c in tables[t].primary_key.columns] == ["bucket", "type"]
        assert [i.name for i in tables[t].indexes] == [f"ix_{t}_type_bucket"]


def test_every_consumer_writes_the_tables_in_one_order_with_a_stage_each() -> None:
    a, b = spec(granularities=["minute", "hour", "day"]), parse_rollup({**BASE, "name": "y", "granularity": "hour"})
    ups = upserts([compile_rollup(a), compile_rollup(b)])
    assert [u.table for u in ups] == ["agg_x", "agg_x__hour", "agg_x__day", "agg_y"]
    assert [u.stage for u in ups] == ["tally_stage_x", "tally_stage_x__hour", "tally_stage_x__day", "tally_stage_y"]
    assert 'INSERT INTO "agg_x__day"' in str(ups[2].statement)


def test_the_fill_locks_the_base_table_then_rebuilds_each_table_from_the_finer_one() -> None:
    s = spec(granularities=["minute", "hour", "day"])
    sql = fill_statements(s)
    assert sql[0] == 'LOCK TABLE "agg_x" IN SHARE MODE'
    assert sql[1:3] == ['DELETE FROM "agg_x__hour"', sql[2]] and 'FROM "agg_x" GROUP BY 1, 2' in sql[2]
    assert "date_trunc('day', bucket, 'UTC')" in sql[4] and 'FROM "agg_x__hour"' in sql[4]
    assert 'CAST(sum("count") AS bigint)' in sql[2] and 'min("min_properties_a")' in sql[2]
    assert len(fill_statements(s, ["day"])) == 3  # the lock, then day alone (from the exact hour table)
    assert fill_statements(spec()) == []


def _registered(s: RollupSpec, granularities: tuple[str, ...] = (), retired: bool = False) -> RegisteredRollup:
    return RegisteredRollup(s.name, fingerprint(s), retired, granularities)


def test_migrations_fill_added_granularities_and_keep_removed_tables() -> None:
    coarse, plain = spec(granularities=["minute", "hour", "day"]), spec()
    new = plan_registry({}, [coarse])
    assert (new.add, new.fill, new.changed) == ([coarse], [(coarse, ("hour", "day"))], True)
    added = plan_registry({"x": _registered(plain, ())}, [coarse])  # a registry row older than coarse tables
    assert (added.regranulate, added.fill, added.changed) == ([coarse], [(coarse, ("hour", "day"))], True)
    same = plan_registry({"x": _registered(coarse, ("minute", "hour", "day"))}, [coarse])
    assert (same.fill, same.changed) == ([], False)
    only_day = spec(granularities=["minute", "day"])
    fewer = plan_registry({"x": _registered(coarse, ("minute", "hour", "day"))}, [only_day])
    assert (fewer.regranulate, fewer.fill, fewer.dropped, fewer.changed) == ([only_day], [], ["x hour"], True)
    revived = plan_registry({"x": _registered(plain, ("minute",), retired=True)}, [coarse])
    assert (revived.revive, revived.fill) == (["x"], [(coarse, ("hour", "day"))])


T0 = datetime(2026, 3, 28, 22, 0, tzinfo=UTC)
_VALUE = st.one_of(st.none(), st.integers(-50, 50).map(Decimal), st.sampled_from([Decimal("0.1"), Decimal("-2.5")]))
_CELL = st.tuples(st.integers(0, 4 * 60 * 24), st.sampled_from(["a", "b", ""]), st.integers(1, 9), _VALUE, _VALUE,
                  _VALUE)


def _oracle(cells: Cells, floor: Any) -> Cells:
    out: dict[tuple[Any, ...], list[Any]] = {}
    for (bucket, kind), (n, s, lo, hi) in cells.items():
        row = out.setdefault((floor(bucket), kind), [0, None, None, None])
        row[0] += n
        row[1] = s if row[1] is None else row[1] if s is None else row[1] + s
        row[2] = lo if row[2] is None else row[2] if lo is None else min(row[2], lo)
        row[3] = hi if row[3] is None else row[3] if hi is None else max(row[3], hi)
    return out


@given(st.lists(_CELL, max_size=60))
def test_coarse_cells_are_the_base_cells_rebucketed(raw: list[tuple[Any, ...]]) -> None:
    plan = compile_rollup(spec(granularities=["minute", "hour", "day"]))
    cells: Cells = {(T0 + timedelta(minutes=m), kind): [n, s, lo, hi] for m, kind, n, s, lo, hi in raw}
    hour = coarse_cells(plan, "hour", cells)
    assert hour == _oracle(cells, lambda b: b.replace(minute=0))
    by_table = table_cells(plan, cells)
    assert by_table["agg_x"] is cells
    assert by_table["agg_x__hour"] == hour
    assert by_table["agg_x__day"] == _oracle(cells, lambda b: b.replace(hour=0, minute=0))
    assert all(k[0].tzinfo is UTC for k in by_table["agg_x__day"])
