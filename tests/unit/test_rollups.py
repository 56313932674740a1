"""Rollup declarations -> specs: column names, where values, and refusals that say why."""

from __future__ import annotations

import tomllib

import pytest

from consumers.aggregate import aggregate, compile_rollups
from core.settings import DEFAULT_ROLLUPS, Settings
from schemas.rollups import RollupSpecError, dimension_text, load_rollups, parse_rollups
from tests.records import views


def test_shipped_rollups_and_column_names() -> None:
    specs = load_rollups(DEFAULT_ROLLUPS)
    assert [s.name for s in specs] == ["events_by_type", "page_views"]
    by_type, views = specs
    assert by_type.table == "agg_events_by_type" and by_type.granularity == "minute"
    assert by_type.key_columns == ("bucket", "type", "source")
    assert by_type.measure_columns == (
        "count",
        "sum_properties_amount",
        "min_properties_amount",
        "max_properties_amount",
        "uniq_user_id",
        "quantiles_properties_amount",
    )
    assert by_type.measure_fields == (
        "count",
        "sum_properties_amount",
        "min_properties_amount",
        "max_properties_amount",
        "uniq_user_id",
        "p50_properties_amount",
        "p95_properties_amount",
        "p99_properties_amount",
    )
    assert views.dimension_columns == ("properties_country", "properties_path")
    assert views.where == {"type": ("page_view",)}
    assert Settings().rollups == specs


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('[[rollup]]\nname = "Bad-Name"', "must match"),
        ('[[rollup]]\nname = "a"\ngranularity = "week"', "granularity must be one of"),
        ('[[rollup]]\nname = "a"\ndimensions = ["country"]', "'country' must be one of"),
        ('[[rollup]]\nname = "a"\ndimensions = ["properties.a b"]', "properties.<key>"),
        (
            '[[rollup]]\nname = "a"\nmeasures = ["avg:properties.x"]',
            "op 'avg' must be sum, min, max, uniq or quantiles",
        ),
        ('[[rollup]]\nname = "a"\nmeasures = ["uniq:user_id:lg_k=3"]', "lg_k '3' must be an integer from 4 to 21"),
        ('[[rollup]]\nname = "a"\nmeasures = [{ uniq = "user_id", k = 3 }]', "uniq takes lg_k"),
        ('[[rollup]]\nname = "a"\nmeasures = [{ quantiles = "properties.x", k = "big" }]', "k must be an integer"),
        ('[[rollup]]\nname = "a"\nmeasures = ["sum"]', "'count' or '<op>:<path>'"),
        ('[[rollup]]\nname = "a"\nmeasures = []', "at least one measure"),
        ('[[rollup]]\nname = "a"\ndimensions = ["properties.count"]\nmeasures = ["count"]', None),
        ('[[rollup]]\nname = "a"\ndimensions = ["properties.x_y", "properties.x.y"]', "collide: properties_x_y"),
        ('[[rollup]]\nname = "a"\n[[rollup]]\nname = "a"', "unique"),
        ("", "no [[rollup]]"),
    ],
)
def test_refusals_say_why(toml: str, words: str | None) -> None:
    doc = tomllib.loads(toml)
    if words is None:
        assert parse_rollups(doc)[0].dimension_columns == ("properties_count",)
        return
    with pytest.raises(RollupSpecError, match=words.replace("[", r"\[").replace("(", r"\(")):
        parse_rollups(doc)


def test_where_values_use_the_stored_text_of_a_value() -> None:
    spec = parse_rollups(
        tomllib.loads(
            '[[rollup]]\nname = "paid"\nwhere = { "properties.paid" = true, type = ["a", "b"], "properties.n" = 2 }'
        )
    )[0]
    assert spec.where == {"properties.paid": ("true",), "type": ("a", "b"), "properties.n": ("2",)}
    plans = compile_rollups([spec])
    events = [
        {"type": "a", "ts": 0, "properties": {"paid": True, "n": 2}},
        {"type": "b", "ts": 0, "properties": {"paid": True, "n": 2}},
        {"type": "a", "ts": 0, "properties": {"paid": False, "n": 2}},
        {"type": "c", "ts": 0, "properties": {"paid": True, "n": 2}},
        {"type": "a", "ts": 0, "properties": {"paid": True, "n": 3}},
    ]
    cells = aggregate(plans, views(plans, events))["paid"]
    assert [v[0] for v in cells.values()] == [2]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, ""),
        ("DE", "DE"),
        ("a\x00b", "a\ufffdb"),
        (True, "true"),
        (False, "false"),
        (3, "3"),
        (1.5, "1.5"),
        ({"b": 1, "a": [2]}, '{"b":1,"a":[2]}'),
    ],
)
def test_dimension_text(value: object, text: str) -> None:
    assert dimension_text(value) == text
