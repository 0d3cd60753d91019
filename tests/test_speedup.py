"""The speedup verdicts: the ratio's bootstrap interval decides between a ratio and "no measurable difference"."""

from __future__ import annotations

import pytest

from a2a_bench.bench.speedup import Ratio, ratio_interval, verdict


def test_identical_configs_read_same_config() -> None:
    assert verdict(None) == "same config"


def test_an_interval_that_holds_one_reads_no_measurable_difference() -> None:
    tuned = [100.0, 104.0, 97.0, 101.0, 99.0, 103.0, 98.0, 102.0]
    default = [101.0, 98.0, 103.0, 99.0, 102.0, 97.0, 104.0, 100.0]  # the same times, another order
    ratio = ratio_interval(tuned, default)
    assert ratio.low < 1.0 < ratio.high
    assert verdict(ratio).startswith("no measurable difference (")


def test_a_clear_gap_reads_as_the_ratio_with_its_interval() -> None:
    tuned = [50.0, 52.0, 49.0, 51.0, 50.5, 49.5, 51.5, 50.0]
    default = [100.0, 104.0, 97.0, 101.0, 99.0, 103.0, 98.0, 102.0]
    ratio = ratio_interval(tuned, default)
    assert 1.9 < ratio.low <= ratio.value <= ratio.high < 2.1
    assert verdict(ratio) == f"{ratio.value:.2f}x ({ratio.low:.2f}–{ratio.high:.2f})"
    assert ratio_interval(tuned, default) == ratio  # seeded: every rank computes the same


def test_the_interval_needs_pairs_of_blocks() -> None:
    with pytest.raises(ValueError, match="two pairs"):
        ratio_interval([1.0], [1.0])
    assert Ratio(1.0, 0.9, 1.1).includes_one and not Ratio(1.5, 1.2, 1.8).includes_one
