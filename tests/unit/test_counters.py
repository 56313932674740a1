"""Pure parts of the console's counters: the Prometheus text sum and TALLY_METRICS_TARGETS."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.settings import Settings, parse_targets
from query.counters import COUNTERS, sum_counters


def test_counters_are_summed_over_labels_and_absent_ones_are_zero() -> None:
    text = (
        "# TYPE tally_dlq_records_total counter\n"
        'tally_dlq_records_total{reason="undecodable"} 2.0\n'
        'tally_dlq_records_total{reason="invalid"} 5.5\n'
        "tally_dlq_records_created 1.7e9\n"
        "# TYPE other_total counter\n"
        "other_total 100.0\n"
    )
    assert sum_counters(text) == {**dict.fromkeys(COUNTERS, 0.0), "tally_dlq_records_total": 7.5}
    assert sum_counters("") == dict.fromkeys(COUNTERS, 0.0)


def test_targets_are_named_pairs_and_an_equals_sign_in_a_url_stays_in_it() -> None:
    assert parse_targets(" ingest=http://a:8000/metrics ,, http://b:9101/metrics?x=1 ") == (
        ("ingest", "http://a:8000/metrics"),
        ("target-2", "http://b:9101/metrics?x=1"),
    )
    assert parse_targets("") == ()


@pytest.mark.parametrize("bad", ["ingest=ftp://a/metrics", "a:8000/metrics", "ingest="])
def test_a_malformed_target_is_refused_at_start_up(bad: str) -> None:
    with pytest.raises(ValueError, match="TALLY_METRICS_TARGETS"):
        parse_targets(bad)
    with pytest.raises(ValidationError, match="TALLY_METRICS_TARGETS"):
        Settings(env="test", metrics_targets=bad)
