"""Sketch measures in the rollup spec (issue 19): how they are declared, named and offered as fields."""

from __future__ import annotations

import pytest

from schemas.rollups import DEFAULT_K, DEFAULT_LG_K, Field, definition, fingerprint, parse_rollups


def spec_of(measures: str, dimensions: str = '["type"]') -> object:
    import tomllib

    doc = tomllib.loads(f'[[rollup]]\nname = "r"\ndimensions = {dimensions}\nmeasures = {measures}\n')
    return parse_rollups(doc)[0]


def test_sketch_measures_columns_precision_and_declarations() -> None:
    spec = spec_of(
        '["count", "sum:properties.amount", "uniq:user_id", "quantiles:properties.amount",'
        ' { uniq = "properties.path", lg_k = 12 }, "quantiles:properties.ms:k=800"]'
    )
    assert spec.measure_columns == (  # type: ignore[attr-defined]
        "count",
        "sum_properties_amount",
        "uniq_user_id",
        "quantiles_properties_amount",
        "uniq_properties_path",
        "quantiles_properties_ms",
    )
    assert [m.precision for m in spec.measures] == [None, None, DEFAULT_LG_K, DEFAULT_K, 12, 800]  # type: ignore[attr-defined]
    # The default precision is left out of the declaration, so the fingerprint names only a real choice.
    assert definition(spec)["measures"] == [  # type: ignore[arg-type]
        "count",
        "sum:properties.amount",
        "uniq:user_id",
        "quantiles:properties.amount",
        "uniq:properties.path:lg_k=12",
        "quantiles:properties.ms:k=800",
    ]
    assert spec.sketch_columns == (  # type: ignore[attr-defined]
        "uniq_user_id",
        "quantiles_properties_amount",
        "uniq_properties_path",
        "quantiles_properties_ms",
    )


def test_the_table_form_and_the_string_form_are_one_rollup() -> None:
    a = spec_of('["count", { uniq = "user_id", lg_k = 16 }]')
    b = spec_of('["count", "uniq:user_id:lg_k=16"]')
    c = spec_of('["count", "uniq:user_id"]')
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)  # type: ignore[arg-type]


def test_fields_a_query_may_name() -> None:
    spec = spec_of('["count", "sum:properties.amount", "uniq:user_id", "quantiles:properties.amount"]')
    assert spec.measure_fields == (  # type: ignore[attr-defined]
        "count",
        "sum_properties_amount",
        "uniq_user_id",
        "p50_properties_amount",
        "p95_properties_amount",
        "p99_properties_amount",
    )
    assert spec.offered_fields == (*spec.measure_fields, "avg_properties_amount")  # type: ignore[attr-defined]
    field = spec.field  # type: ignore[attr-defined]
    assert field("count") == Field("count", "column", ("count",))
    assert field("uniq_user_id") == Field("uniq_user_id", "uniq", ("uniq_user_id",))
    assert field("avg_properties_amount") == Field("avg_properties_amount", "avg", ("sum_properties_amount", "count"))
    assert field("p1_properties_amount") == Field(
        "p1_properties_amount", "percentile", ("quantiles_properties_amount",), 0.01
    )
    assert field("p999_properties_amount").rank == 0.999
    assert field("p99_properties_amount").rank == 0.99
    for unknown in (
        "quantiles_properties_amount",
        "p0_properties_amount",
        "p100_properties_amount",
        "p05_properties_amount",
        "p50_user_id",
        "avg_user_id",
        "bucket",
        "type",
    ):
        assert field(unknown) is None, unknown
    assert field("uniq_user_id").sketch and field("p50_properties_amount").sketch
    assert not field("avg_properties_amount").sketch and not field("count").sketch


def test_no_average_without_a_count() -> None:
    spec = spec_of('["sum:properties.amount", "uniq:user_id"]')
    assert spec.average_fields == ()  # type: ignore[attr-defined]
    assert spec.field("avg_properties_amount") is None  # type: ignore[attr-defined]


@pytest.mark.parametrize("measures", ['["uniq:user_id"]', '["quantiles:properties.x"]'])
def test_a_rollup_of_sketches_alone_is_valid(measures: str) -> None:
    assert spec_of(measures).measures[0].is_sketch  # type: ignore[attr-defined]
