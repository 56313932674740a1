"""The soak's memory verdict on series whose answer is known: it must flag a leak of 2 KiB
per ingest request over `make soak`'s 300 s even when the first 16 MiB of it fill heap the
warm-up bursts freed (as a real injected leak did), and pass a flat process with ±2 MiB
of noise, a warm-up climb and spikes (clean soaks moved at most 3.8 MiB). A bound that
passes everything would make the soak's memory check one that cannot fail."""

from __future__ import annotations

import os
import random

import pytest

from tests.soak import memory

MIB = memory.MIB
REQUESTS_PER_SECOND = 90  # the soak's ingest: 80 slots/s plus keyed retries and conflicts


def series(seconds: float, *, base: float = 100 * MIB, leak_per_request: float = 0.0, absorbed: float = 0.0,
           seed: int = 1, every: float = 2.5) -> list[memory.Sample]:
    """RSS that climbs 25 MiB during the first tenth, then stays flat within ±2 MiB of noise, with a 6 MiB
    spike every 40 samples, plus `leak_per_request` bytes per ingest request beyond the first `absorbed`
    bytes (those fill heap the warm-up bursts freed, without raising RSS)."""
    rng = random.Random(seed)
    out = []
    for i in range(int(seconds / every) + 1):
        at = i * every
        climb = 25 * MIB * min(1.0, at / (0.1 * seconds))
        noise = rng.uniform(-2, 2) * MIB + (6 * MIB if i % 40 == 39 else 0)
        leak = max(0.0, leak_per_request * REQUESTS_PER_SECOND * at - absorbed)
        out.append(memory.Sample(at, int(base - 25 * MIB + climb + noise + leak)))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_a_flat_noisy_process_passes(seed: int) -> None:
    for seconds in (60, 300):
        verdict = memory.judge("flat", series(seconds, seed=seed, every=min(5.0, max(0.5, seconds / 120))), seconds)
        assert verdict.ok, verdict.row()


@pytest.mark.parametrize("seed", range(5))
def test_a_leak_of_2_kib_per_request_fails_in_300_s(seed: int) -> None:
    verdict = memory.judge("leaky", series(300, leak_per_request=2048, absorbed=16 * MIB, seed=seed), 300)
    assert not verdict.ok, verdict.row()


@pytest.mark.parametrize("seed", range(5))
def test_a_leak_of_1_kib_per_request_fails_in_300_s_when_nothing_absorbs_it(seed: int) -> None:
    verdict = memory.judge("leaky", series(300, leak_per_request=1024, seed=seed), 300)
    assert not verdict.ok, verdict.row()


def test_the_60_s_run_catches_only_larger_leaks() -> None:
    assert memory.judge("leaky", series(60, leak_per_request=1024, absorbed=16 * MIB, every=0.5), 60).ok
    assert not memory.judge("leaky", series(60, leak_per_request=7 * 1024, absorbed=16 * MIB, every=0.5), 60).ok


def test_a_bigger_process_gets_a_proportional_slack() -> None:
    big = series(300, base=400 * MIB, leak_per_request=1024)
    verdict = memory.judge("big", big, 300)
    assert verdict.bound - verdict.baseline == pytest.approx(0.04 * verdict.baseline + 6 * MIB, abs=1)


def test_too_few_samples_is_an_error_not_a_pass() -> None:
    with pytest.raises(ValueError, match="too few samples"):
        memory.judge("short", series(300, every=100), 300)


def test_rss_of_this_process() -> None:
    rss = memory.rss_bytes(os.getpid())
    assert rss is not None and 10 * MIB < rss < 4096 * MIB
    assert memory.rss_bytes(2**22 + 12345) is None
