"""Evaluation statistics on data whose answers are known by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marble.eval import monitors
from marble.eval.stats import (
    bootstrap_mean_ci,
    composite_zscores,
    dominates,
    paired_delta_ci,
    win_rate,
)


def test_bootstrap_ci_of_a_constant_is_a_point():
    iv = bootstrap_mean_ci(np.full(20, 3.5), num_samples=200)
    assert (iv.mean, iv.ci_lo, iv.ci_hi, iv.n) == (3.5, 3.5, 3.5, 20)


def test_bootstrap_ci_matches_the_normal_approximation():
    # 400 draws of N(1, 2^2): the mean's standard error is 2/sqrt(400) = 0.1, so the 95% interval
    # is about mean +- 1.96 x 0.1 = +-0.196 wide on each side.
    x = np.random.default_rng(0).normal(1.0, 2.0, size=400)
    iv = bootstrap_mean_ci(x, num_samples=4000, seed=1)
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert iv.mean == pytest.approx(x.mean())
    assert iv.ci_lo < iv.mean < iv.ci_hi
    assert iv.mean - iv.ci_lo == pytest.approx(1.96 * se, rel=0.12)
    assert iv.ci_hi - iv.mean == pytest.approx(1.96 * se, rel=0.12)


def test_bootstrap_ci_drops_nan_and_handles_empty():
    iv = bootstrap_mean_ci(np.array([1.0, np.nan, 3.0]), num_samples=100)
    assert iv.n == 2 and iv.mean == 2.0 and 1.0 <= iv.ci_lo <= iv.ci_hi <= 3.0
    empty = bootstrap_mean_ci(np.array([np.nan, np.nan]))
    assert empty.n == 0 and np.isnan(empty.mean)


def test_bootstrap_is_seeded():
    x = np.arange(10.0)
    assert bootstrap_mean_ci(x, seed=3) == bootstrap_mean_ci(x, seed=3)


def test_paired_delta_uses_pairs_and_shared_noise():
    # Base has large per-sample noise; the adapter adds exactly +0.5 to each sample: the paired delta
    # is exactly 0.5 with a zero-width interval, although the two means' own CIs overlap heavily.
    base = np.random.default_rng(0).normal(0, 5, size=50)
    adapter = base + 0.5
    d = paired_delta_ci(base, adapter, num_samples=300)
    assert d.mean == pytest.approx(0.5) and d.ci_lo == pytest.approx(0.5) and d.ci_hi == pytest.approx(0.5)
    base[3] = np.nan  # a prompt the reward does not apply to is not paired
    assert paired_delta_ci(base, adapter).n == 49


def test_win_rate_counts_ties_as_half():
    base = np.array([0.0, 1.0, 2.0, 3.0, np.nan])
    adapter = np.array([1.0, 1.0, 1.0, 4.0, 9.0])
    # wins at 0 and 3, tie at 1, loss at 2; the NaN pair is ignored: (2 + 0.5) / 4
    assert win_rate(base, adapter) == pytest.approx(0.625)
    assert np.isnan(win_rate(np.array([np.nan]), np.array([1.0])))


def test_composite_is_mean_of_population_zscores():
    table = np.array([[0.0, 10.0], [2.0, 30.0], [4.0, 20.0]])
    # column 0: mean 2, population std sqrt(8/3); column 1: mean 20, std sqrt(200/3)
    z0 = (table[:, 0] - 2) / np.sqrt(8 / 3)
    z1 = (table[:, 1] - 20) / np.sqrt(200 / 3)
    np.testing.assert_allclose(composite_zscores(table), (z0 + z1) / 2)
    # two models: every column contributes +-1, a tied column 0
    np.testing.assert_allclose(composite_zscores(np.array([[0.0, 5.0, 1.0], [1.0, 5.0, 0.0]])), [0.0, 0.0])
    np.testing.assert_allclose(composite_zscores(np.array([[0.0, 5.0], [1.0, 5.0]])), [-0.5, 0.5])


def test_composite_reproduces_the_paper_ordering():
    # docs/algorithm.md §7, all eight columns (5 trained + 3 held out) for base, weighted sum, sequential
    # and MARBLE: MARBLE has the best composite, the base the worst. (On the five trained columns
    # alone sequential edges out MARBLE, 0.81 vs 0.70: the held-out columns decide it.)
    t = np.array(
        [
            [0.24, 0.12, 20.51, 0.237, 0.204, 5.13, -0.58, 2.02],
            [0.92, 0.91, 21.53, 0.267, 0.300, 6.15, 1.16, 3.04],
            [0.94, 0.91, 23.80, 0.293, 0.331, 6.01, 1.49, 3.49],
            [0.94, 0.96, 22.83, 0.286, 0.355, 6.59, 1.53, 3.52],
        ]
    )
    c = composite_zscores(t)
    assert list(np.argsort(c)) == [0, 1, 2, 3]
    assert c[3] == pytest.approx(0.7789, abs=1e-3)


def test_pareto_dominance():
    assert dominates([1, 2], [1, 1]) and not dominates([1, 1], [1, 1]) and not dominates([2, 0], [1, 1])
    assert not dominates([np.nan], [1.0])


def test_monitors_on_known_images():
    black = torch.zeros(1, 3, 16, 16)
    white = torch.ones(1, 3, 16, 16)
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1.0
    half = torch.zeros(1, 3, 16, 16)
    half[..., :8] = 1.0  # left half white: one vertical edge, two colours
    x = torch.cat([black, white, red, half])
    m = monitors.compute_monitors(x)
    np.testing.assert_allclose(m["dark_fraction"], [1.0, 0.0, 0.0, 0.5])
    np.testing.assert_allclose(m["saturation"], [0.0, 0.0, 1.0, 0.0])
    # a flat image has zero entropy; two equal halves have 1 bit out of log2(512) = 9 bits
    np.testing.assert_allclose(m["colour_entropy"], [0.0, 0.0, 0.0, 1 / 9])
    assert m["edge_density"][:3].tolist() == [0.0, 0.0, 0.0]
    assert m["edge_density"][3] == pytest.approx(2 / 16)  # the two columns either side of the edge
    assert monitors.relative_shift(0.0, 0.01) == pytest.approx(0.2)
    assert monitors.relative_shift(0.5, 0.75) == pytest.approx(0.5)
