"""Gradient-cosine diagnostics (docs/algorithm.md §6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from marble.rl.balancers import mgda_gamma
from marble.rl.diagnostics import combine_directions, direction_cosines, gram_cosines


def test_direction_cosines_by_hand():
    grads = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    s = direction_cosines(torch.tensor([1.0, 1.0]), grads)
    r = 1 / math.sqrt(2)
    # cos with e1, e2 and -e1: r, r, -r -> min -r, mean r/3, population variance of [r, r, -r]
    assert s.per_reward.tolist() == [r, r, -r]
    assert s.min == -r and abs(s.mean - r / 3) < 1e-15
    assert abs(s.var - np.var([r, r, -r])) < 1e-15


def test_zero_gradient_is_excluded():
    grads = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    s = direction_cosines(torch.tensor([1.0, 0.0]), grads)
    assert s.per_reward[0].item() == 1.0 and math.isnan(s.per_reward[1].item())
    assert s.min == 1.0 and s.var == 0.0


def test_gram_cosines_equal_explicit_ones():
    X = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gamma = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    a = gram_cosines(X @ X.T, gamma)
    b = direction_cosines(combine_directions(gamma, X), X)
    torch.testing.assert_close(a.per_reward, b.per_reward, rtol=1e-12, atol=1e-14)


def test_fresh_mgda_direction_never_conflicts_on_its_own_batch():
    """The min-norm direction has cos(d, g_k) >= 0 for every k (MGDA's common-descent property),
    while a plain sum of strongly conflicting gradients does not."""
    rng = np.random.default_rng(1)
    sum_conflicts = 0
    for _ in range(20):
        X = torch.as_tensor(rng.normal(size=(4, 6)) * rng.uniform(0.05, 20, size=(4, 1)))
        G = X @ X.T
        assert gram_cosines(G, mgda_gamma(G)).min >= -1e-9
        sum_conflicts += gram_cosines(G, torch.ones(4, dtype=torch.float64)).min < 0
    assert sum_conflicts > 0


def test_step_output_cosine_metrics_against_brute_force():
    """The per-step alignment figures the trainer logs from each micro-step's output-space Gram equal
    the explicit cosines of `Σ γ_k g_k` with every g_k (a reward with no gradient on a micro-step
    is left out of that micro-step's figures)."""
    from marble.train.stepping import applied_cosine_metrics

    rng = np.random.default_rng(3)
    names = ["a", "b", "c"]
    cosines, brute = [], []
    for m in range(5):
        X = rng.normal(size=(3, 7))
        if m == 2:
            X[1] = 0.0  # reward b has no valid sample on this micro-step
        gamma = rng.uniform(0.1, 2.0, size=3)
        cosines.append(gram_cosines(torch.as_tensor(X @ X.T), torch.as_tensor(gamma)).per_reward)
        d = gamma @ X
        brute.append([d @ x / (np.linalg.norm(d) * np.linalg.norm(x)) if x.any() else np.nan for x in X])
    brute = np.array(brute)  # [M, K]
    out = applied_cosine_metrics(cosines, names)
    for k, n in enumerate(names):
        assert out[f"balance/cos_output/{n}"] == pytest.approx(np.nanmean(brute[:, k]), abs=1e-12)
    mins = np.nanmin(brute, axis=1)
    assert out["balance/cos_output_min"] == pytest.approx(mins.mean(), abs=1e-12)
    assert out["balance/cos_output_negative_frac"] == pytest.approx((mins < 0).mean())
    assert 0 < out["balance/cos_output_negative_frac"] < 1  # the draw has both kinds of micro-step
