"""Accuracy of the sketch measures (issue 19) on generated data, built the way Tally builds them.

The issue promises `uniq_*` within 2 % relative error at 99 % confidence (exact below 1,000
distinct values) and every pNN within 1 % normalized rank error at 99 % confidence. These tests
hold the defaults (`DEFAULT_LG_K`, `DEFAULT_K`) to the tighter figures schemas/sketches.py
documents, at 10, 1,000, 100,000 and 1,000,000 values, and check that those figures meet the
goals. A value never comes from one sketch: the data is cut into batches, each batch sketched,
batches united into rows (`union`), rows stored as bytes (`encode`) and read back the way the
query API reads them (`distinct_count`, `quantile_values`), so the bound is tested on the
merged sketches a query actually sees. The smaller cardinalities also go through the consumer's
own path (`aggregate` per batch, `merge`, `table_cells` into every stored table).

Determinism: the data comes from fixed seeds and HLL hashing is fixed, so the `uniq` checks
are deterministic. KLL compaction draws from DataSketches' internal random generator, which
Python cannot seed: a quantile's rank error differs from run to run, and any single query can
exceed its 99 % bound with probability up to 1 %. The bound is still used exactly as documented
(the observed errors are far below it: see `test_quantile_rank_error_is_within_the_documented_bound`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import orjson
import pytest

from consumers.aggregate import Aggregates, aggregate, bucket_of, compile_rollups, merge, plan_keys, table_cells
from consumers.view import reader
from schemas import sketches
from schemas.events import EventLimits, normalize_event
from schemas.rollups import DEFAULT_K, DEFAULT_LG_K, parse_rollup

UNIQ_GOAL = 0.02  # the relative error at 99 % confidence
RANK_GOAL = 0.01  # the normalized rank error at 99 % confidence
EXACT_BELOW = 1_000  # the issue: uniq is exact below this many distinct values (tested at it too)
SPEC = parse_rollup(
    {
        "name": "acc",
        "granularities": ["minute", "hour", "day"],
        "dimensions": ["type"],
        "measures": ["count", "uniq:user_id", "quantiles:properties.ms"],
    }
)
PLANS = compile_rollups([SPEC])
UNIQ_AT, QUANTILES_AT = 1, 2  # the measures' places in SPEC
FIELDS = ("p1", "p50", "p95", "p99", "p999")


def _rank(percentile: str) -> float:
    """The rank the query API asks the sketches for, from the field's own definition (`Field.rank`)."""
    field = SPEC.field(f"{percentile}_properties_ms")
    assert field is not None and field.kind == "percentile"
    return field.rank


RANKS: dict[str, float] = {p: _rank(p) for p in FIELDS}
EVERY_RANK = [_rank(f"p{d}") for d in (*range(1, 100), 999)]
RECEIVED = 1_796_000_000_000
SPAN_MS = 5 * 3_600_000  # events over five hours: hundreds of minute rows, several hour rows, one or two days


def _cut(n: int, parts: int, rng: random.Random) -> list[tuple[int, int]]:
    """`range(n)` cut at random into `parts` (possibly empty) consecutive slices, as (start, stop)."""
    cuts = sorted(rng.randrange(n + 1) for _ in range(parts - 1))
    bounds = [0, *cuts, n]
    return list(pairwise(bounds))


def _stored(batches: Sequence[Any], rows: int, rng: random.Random) -> list[bytes]:
    """Batch sketches united into `rows` rows (each a `union` fold of a random run of batches), stored."""
    out: list[bytes] = []
    for start, stop in _cut(len(batches), rows, rng):
        row = None
        for batch in batches[start:stop]:
            row = sketches.union(row, batch)
        if row is not None:
            out.append(sketches.encode(row))
    return out


def _users(n: int, seed: int, copies: int) -> list[str]:
    """`n` distinct user ids, each `copies` times, shuffled: a sketch must see through the repeats."""
    rng = random.Random(seed)
    users = [f"user-{seed}-{i}" for i in range(n)] * copies
    rng.shuffle(users)
    return users


def _stored_uniq(values: Sequence[str], batches: int, rows: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    sketched = [sketches.new_uniq(DEFAULT_LG_K, values[a:b]) for a, b in _cut(len(values), batches, rng)]
    return _stored(sketched, rows, rng)


def _stored_quantiles(values: np.ndarray, batches: int, rows: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    cuts = _cut(len(values), batches, rng)
    sketched = [sketches.new_quantiles(DEFAULT_K, values[a:b].tolist()) for a, b in cuts]
    return _stored(sketched, rows, rng)


def exact_quantile(ordered: Sequence[float], rank: float) -> float:
    """The inclusive quantile at `rank` of all the values, as DataSketches defines it.

    `get_quantile(rank, True)` on a sketch holding every value returns the smallest value v
    with at least ceil(rank × n) values ≤ v (the first value for rank 0), and computes
    rank × n in double arithmetic: p7 of 100 values is 0.07 × 100 = 7.000000000000001, so
    ceil gives 8 and the answer is the 8th smallest, not the 7th. This is that definition,
    double product included.
    """
    return ordered[max(math.ceil(rank * len(ordered)), 1) - 1]


def rank_error(ordered: np.ndarray, value: float | None, rank: float) -> float:
    """How far `rank` is from the ranks `value` holds among the sorted values (0 if it holds it).

    A value with ties holds every inclusive rank from (values below it) / n to (values up to it) / n.
    The value must be one of the values: a KLL returns only items it was given.
    """
    assert value is not None
    n = len(ordered)
    below = int(np.searchsorted(ordered, value, "left"))
    upto = int(np.searchsorted(ordered, value, "right"))
    assert upto > below, f"{value!r} is not one of the values"
    return max(0.0, below / n - rank, rank - upto / n)


def _uniform(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(0.0, 1_000.0, n)


def _lognormal(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.lognormal(3.0, 1.5, n)  # latency-like: a long right tail, where p99 and p999 live


def _ties(rng: np.random.Generator, n: int) -> np.ndarray:
    """Whole milliseconds with a 30 % mass at zero: few distinct values, each held by many."""
    return np.where(rng.random(n) < 0.3, 0.0, np.floor(rng.exponential(20.0, n)))


DISTRIBUTIONS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "uniform": _uniform,
    "lognormal": _lognormal,
    "ties": _ties,
}


def test_the_documented_bounds_are_what_the_functions_return_and_meet_the_goals() -> None:
    doc = " ".join((sketches.__doc__ or "").split())
    assert (DEFAULT_LG_K, DEFAULT_K) == (15, 400)  # the precisions the docstring's figures are for
    uniq = sketches.uniq_error(DEFAULT_LG_K)
    rank = sketches.quantile_error(DEFAULT_K)
    assert uniq == pytest.approx(0.00574, abs=5e-6)
    assert rank == pytest.approx(0.00678, abs=5e-6)
    assert f"lg_k 15: {100 * uniq:.3f} %," in doc  # 0.574 %
    assert f"so {100 * sketches.Z_99 * uniq:.2f} % at 99 % confidence" in doc  # 1.48 %
    assert f"{100 * rank:.2f} % at 99 % confidence for k = 400" in doc  # 0.68 %
    assert sketches.Z_99 * uniq <= UNIQ_GOAL
    assert rank <= RANK_GOAL


@pytest.mark.parametrize("n", [10, 500, 999, EXACT_BELOW])
@pytest.mark.parametrize("seed", range(20))
def test_uniq_is_exact_up_to_a_thousand_distinct_values(n: int, seed: int) -> None:
    """Exact while the HLL is sparse (a list of 26-bit coupons, not registers).

    Exact is near-certain, not certain: two values whose coupons collide count once. For
    `user-<seed>-<i>` values that loses one value for about 3 in 1,000 seeds at 1,000 distinct
    values and 1 in 2,000 at 500; seeds 0-19 hit none, and the hashing is fixed, so this passes
    or fails the same way every run.
    """
    users = _users(n, seed, copies=3)
    stored = _stored_uniq(users, batches=12, rows=4, seed=seed)
    assert sketches.distinct_count(stored) == n


@pytest.mark.parametrize(("n", "seeds"), [(100_000, range(8)), (1_000_000, range(2))])
def test_uniq_is_within_the_documented_bound(n: int, seeds: range) -> None:
    """|estimate − n| / n ≤ Z_99 × uniq_error(lg_k) (1.48 % at lg_k 15), for every seed.

    Unions of sketches that each hold registers (as every batch here does) estimate from the
    registers alone, which are one sketch's whatever the split: two splits give one estimate.
    One sketch updated directly estimates differently (DataSketches' HIP estimator, which a
    union keeps only while it adds sparse sketches to a single register-holding one): a row
    whose values all came in one batch answers with that estimate, so it is held to the bound too.
    """
    bound = sketches.Z_99 * sketches.uniq_error(DEFAULT_LG_K)
    assert bound <= UNIQ_GOAL
    for seed in seeds:
        users = _users(n, seed, copies=2)
        estimate = sketches.distinct_count(_stored_uniq(users, batches=40, rows=8, seed=seed))
        assert abs(estimate - n) / n <= bound, (seed, estimate)
        assert sketches.distinct_count(_stored_uniq(users, batches=3, rows=2, seed=seed + 1)) == estimate
        one = sketches.distinct_count([sketches.encode(sketches.new_uniq(DEFAULT_LG_K, users))])
        assert abs(one - n) / n <= bound, (seed, one)


@pytest.mark.parametrize("n", [1, 10, 137, DEFAULT_K - 1])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_quantiles_are_exact_below_k(n: int, distribution: str) -> None:
    """Fewer than k values in all: nothing is compacted, and every pNN field (p1-p99, p999) is
    exactly the inclusive quantile of the values (`exact_quantile`: DataSketches' definition)."""
    values = DISTRIBUTIONS[distribution](np.random.default_rng(n), n)
    stored = _stored_quantiles(values, batches=6, rows=3, seed=n)
    ordered = sorted(values.tolist())
    assert sketches.quantile_values(stored, EVERY_RANK) == [exact_quantile(ordered, r) for r in EVERY_RANK]


@pytest.mark.parametrize("n", [10, 1_000, 100_000, 1_000_000])
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_quantile_rank_error_is_within_the_documented_bound(n: int, distribution: str) -> None:
    """Each of p1, p50, p95, p99 and p999 within quantile_error(k) (0.68 % at k = 400) of its rank.

    KLL compaction is random and unseedable (see the module docstring): each query may exceed
    its 99 % bound with probability up to 1 %. Observed errors are well below it.
    """
    bound = sketches.quantile_error(DEFAULT_K)
    assert bound <= RANK_GOAL
    values = DISTRIBUTIONS[distribution](np.random.default_rng(n), n)
    stored = _stored_quantiles(values, batches=max(1, min(100, n // 1_000)) * 4, rows=8, seed=n)
    ordered = np.sort(values)
    got = sketches.quantile_values(stored, list(RANKS.values()))
    errors = {p: rank_error(ordered, v, r) for (p, r), v in zip(RANKS.items(), got, strict=True)}
    assert max(errors.values()) <= bound, errors


def _events(n_users: int, seed: int) -> list[dict[str, Any]]:
    """Normalized events (what ingest writes) of `n_users` users, each three times, over five hours."""
    rng = random.Random(seed)
    return [
        orjson.loads(
            normalize_event(
                {
                    "type": rng.choice(["click", "view"]),
                    "ts": RECEIVED - rng.randrange(SPAN_MS),
                    "user_id": user,
                    "properties": {"ms": rng.choice([rng.lognormvariate(3.0, 1.5), float(rng.randrange(50))])},
                },
                RECEIVED,
                EventLimits(),
            )
        )
        for user in _users(n_users, seed, copies=3)
    ]


def _aggregated(events: list[dict[str, Any]], seed: int) -> Aggregates:
    """The events through the consumer's aggregation in random batches, the batches merged."""
    read = reader(plan_keys(PLANS))
    total: Aggregates = {}
    for a, b in _cut(len(events), 10, random.Random(seed)):
        total = merge(PLANS, total, aggregate(PLANS, read.views(events[a:b]), now_ms=RECEIVED))
    return total


def _expected(events: list[dict[str, Any]], granularity: str) -> dict[tuple[Any, ...], tuple[set[str], list[float]]]:
    """Per row of the `granularity` table, built here from the events: its users and its values."""
    rows: dict[tuple[Any, ...], tuple[set[str], list[float]]] = {}
    for e in events:
        users, values = rows.setdefault((bucket_of(e["ts"], granularity), e["type"]), (set(), []))
        users.add(e["user_id"])
        values.append(e["properties"]["ms"])
    return rows


def _check_quantiles(values: list[float], stored: list[bytes]) -> None:
    """The stored sketches' p1-p999 against `values`: exact below k values, else within the rank bound."""
    ranks = list(RANKS.values())
    got = sketches.quantile_values(stored, ranks)
    ordered = np.sort(np.array(values, dtype=float))
    if len(values) < DEFAULT_K:
        assert got == [exact_quantile(ordered.tolist(), r) for r in ranks]
    errors = [rank_error(ordered, v, r) for v, r in zip(got, ranks, strict=True)]
    assert max(errors) <= sketches.quantile_error(DEFAULT_K), errors


@pytest.mark.parametrize("n_users", [10, EXACT_BELOW])
@pytest.mark.parametrize("seed", range(5))
def test_every_stored_table_answers_within_the_bounds(n_users: int, seed: int) -> None:
    """Through `aggregate` + `merge` + `table_cells`: in every table (minute, hour, day), each row
    and the union of all rows count their distinct users exactly (fewer than 1,000 each), and
    their p1-p999 are exact while they hold fewer than k values, else within the rank bound."""
    events = _events(n_users, seed)
    tables = table_cells(PLANS[0], _aggregated(events, seed)[SPEC.name])
    assert list(tables) == [SPEC.table_for(g) for g in SPEC.granularities]
    for granularity, cells in zip(SPEC.granularities, tables.values(), strict=True):
        want = _expected(events, granularity)
        assert set(cells) == set(want), granularity
        for key, cell in cells.items():
            users, values = want[key]
            assert cell[0] == len(values)
            assert sketches.distinct_count([sketches.encode(cell[UNIQ_AT])]) == len(users)
            _check_quantiles(values, [sketches.encode(cell[QUANTILES_AT])])
        # A query over the whole span: the union of every stored row of the table.
        assert sketches.distinct_count([sketches.encode(c[UNIQ_AT]) for c in cells.values()]) == n_users
        everything = [e["properties"]["ms"] for e in events]
        _check_quantiles(everything, [sketches.encode(c[QUANTILES_AT]) for c in cells.values()])
