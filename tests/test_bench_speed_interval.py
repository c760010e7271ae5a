"""The throughput study's speed ratio and its paired bootstrap interval (`bench.throughput`)."""

from __future__ import annotations

import pytest

from bench.throughput import amortized_ms, speed_interval


def _steps(ms: list[float], refresh_every: int = 0) -> list[dict]:
    return [
        {"step_ms": m, "refreshes": int(refresh_every > 0 and i % refresh_every == 0)}
        for i, m in enumerate(ms)
    ]


def test_amortized_time_weights_refresh_and_cached_steps():
    steps = _steps([300, 100, 100, 100, 100], refresh_every=5)  # one refresh step in five
    assert amortized_ms(steps, 0.2) == pytest.approx(0.2 * 300 + 0.8 * 100)
    assert amortized_ms(steps, 0.0) == 100  # never refreshes: the cached steps only
    assert amortized_ms(_steps([1, 2, 9]), 1.0) == 2  # every step refreshes: the median of all


def test_rounds_are_resampled_in_pairs():
    # the machine doubles its time on every other round; the preset always costs 10% more in the same
    # round. Paired resampling keeps the ratio exact; resampling each preset alone would not.
    base = _steps([100, 200] * 5)
    slower = _steps([110, 220] * 5)
    lo, hi = speed_interval(base, slower, 0.0, 0.0)
    assert lo == pytest.approx(1 / 1.1) and hi == pytest.approx(1 / 1.1)


def test_interval_covers_the_point_and_is_reproducible():
    base = _steps([100, 104, 97, 110, 99, 101, 95, 108, 102, 100])
    other = _steps([109, 103, 111, 104, 120, 106, 108, 103, 115, 107])
    point = amortized_ms(base, 0.0) / amortized_ms(other, 0.0)
    lo, hi = speed_interval(base, other, 0.0, 0.0)
    assert lo < point < hi and hi - lo > 0.01
    assert speed_interval(base, other, 0.0, 0.0) == (lo, hi)
