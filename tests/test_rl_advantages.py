"""Per-reward group advantages and the optimality probability (docs/algorithm.md §2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from marble.rl.advantages import gdpo_advantages, group_advantages, optimality_probability

NAN = float("nan")


def test_hand_computed_global_std():
    # group 0: [1, 2, 3] -> mean 2; group 1: [4, NaN, 6] -> mean 5 over the valid entries.
    # global population std over the valid [1, 2, 3, 4, 6]: mean 3.2, var = (4.84+1.44+0.04+0.64+7.84)/5 = 2.96
    R = torch.tensor([[1.0], [2.0], [3.0], [4.0], [NAN], [6.0]])
    res = group_advantages(R, [0, 0, 0, 1, 1, 1], std_mode="global")
    std = math.sqrt(2.96)
    expected = [(-1) / (std + 1e-4), 0.0, 1 / (std + 1e-4), -1 / (std + 1e-4), NAN, 1 / (std + 1e-4)]
    got = res.adv[:, 0].tolist()
    assert math.isnan(got[4])
    np.testing.assert_allclose(
        [g for i, g in enumerate(got) if i != 4], [e for i, e in enumerate(expected) if i != 4], rtol=1e-14
    )
    assert res.stats.valid_frac.tolist() == [5 / 6]
    assert res.stats.mean.tolist() == pytest.approx([3.2])
    assert res.stats.reward_std.tolist() == pytest.approx([std])


def test_group_std_mode():
    # group 0: [1, 3] -> mean 2, std 1; group 1: [10, 30] -> mean 20, std 10
    R = torch.tensor([[1.0], [3.0], [10.0], [30.0]])
    adv = group_advantages(R, [7, 7, 3, 3], std_mode="group").adv[:, 0]
    np.testing.assert_allclose(
        adv.tolist(), [-1 / (1 + 1e-4), 1 / (1 + 1e-4), -10 / (10 + 1e-4), 10 / (10 + 1e-4)]
    )


def test_columns_are_independent_and_nan_preserved():
    g = torch.Generator().manual_seed(0)
    R = torch.randn(12, 3, generator=g, dtype=torch.float64)
    R[torch.rand(12, 3, generator=g) < 0.3] = NAN
    R[:, 2] = NAN  # a reward that applies nowhere
    gids = torch.arange(12) // 4
    full = group_advantages(R, gids).adv
    for k in range(3):
        alone = group_advantages(R[:, k : k + 1], gids).adv
        assert torch.equal(torch.isnan(full[:, k]), torch.isnan(R[:, k]))
        torch.testing.assert_close(full[:, k : k + 1], alone, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(full[:, 2]).all()


def test_single_valid_entry_in_group_gets_zero_and_counts_as_zero_std():
    R = torch.tensor([[5.0], [NAN], [1.0], [2.0], [3.0], [3.0]])
    res = group_advantages(R, [0, 0, 1, 1, 2, 2])
    assert res.adv[0, 0].item() == 0.0
    # group 0 (one valid) and group 2 (equal values) have zero std; group 1 does not
    assert res.stats.zero_std_groups.tolist() == [2.0]


def test_infinite_reward_is_treated_as_not_applicable():
    R = torch.tensor([[1.0], [float("inf")], [3.0], [5.0]])
    adv = group_advantages(R, [0, 0, 0, 0]).adv[:, 0]
    assert math.isnan(adv[1].item()) and torch.isfinite(adv[[0, 2, 3]]).all()


def test_bad_inputs_refused():
    with pytest.raises(ValueError, match="std_mode"):
        group_advantages(torch.zeros(2, 1), [0, 0], std_mode="batch")
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(3, 1), [0, 0])
    with pytest.raises(TypeError):
        group_advantages(torch.zeros(2, 1), torch.tensor([0.0, 1.0]))


def test_optimality_probability_clips_and_masks():
    A = torch.tensor([[10.0, -10.0, 2.5, -2.5, 0.0, NAN]])
    r, mask = optimality_probability(A, clip_max=5.0)
    # clip(A/5, -1, 1)/2 + 1/2: 10 -> 1, -10 -> 0, 2.5 -> 0.75, -2.5 -> 0.25, 0 -> 0.5; NaN -> masked (placeholder)
    assert r[0, :5].tolist() == [1.0, 0.0, 0.75, 0.25, 0.5]
    assert mask.tolist() == [[True] * 5 + [False]]
    assert torch.isfinite(r).all()


# ------------------------------------------------------------------------------------------- GDPO
def test_gdpo_hand_computed():
    """GDPO (arXiv 2601.05242 §3): per-reward group normalisation, weighted sum, batch whitening.

    Groups of two, rewards (x, y), weights (1, 2):
      group 0: x = [1, 3] -> mean 2, population std 1 -> A_x = [-1, 1] / (1 + e)
               y = [10, NaN] -> one valid entry -> A_y = [0, NaN] (NaN adds nothing to the sum)
      group 1: x = [2, 2] -> std 0 -> A_x = [0, 0]
               y = [20, 40] -> mean 30, std 10 -> A_y = [-10, 10] / (10 + e)
      group 2: nothing applies -> NaN (no gradient), left out of the whitening
    S = A_x + 2 A_y = [-a, a, -b, b] with a = 1/(1+e), b = 20/(10+e); mean 0;
    Bessel std = sqrt((2a² + 2b²) / 3); A = S / (std + e).
    """
    e = 1e-4
    R = torch.tensor(
        [[1.0, 10.0], [3.0, NAN], [2.0, 20.0], [2.0, 40.0], [NAN, NAN], [NAN, NAN]], dtype=torch.float64
    )
    A = gdpo_advantages(R, [0, 0, 1, 1, 2, 2], torch.tensor([1.0, 2.0]))
    a, b = 1 / (1 + e), 20 / (10 + e)
    std = math.sqrt((2 * a * a + 2 * b * b) / 3)
    assert A.shape == (6, 1)
    np.testing.assert_allclose(A[:4, 0].tolist(), [s / (std + e) for s in (-a, a, -b, b)], rtol=1e-13)
    assert torch.isnan(A[4:]).all()


def test_gdpo_is_scale_free_per_reward_and_ignores_zero_weights():
    g = torch.Generator().manual_seed(3)
    R = torch.randn(16, 3, generator=g, dtype=torch.float64)
    gids = torch.arange(16) // 4
    w = torch.tensor([1.0, 1.0, 0.0])
    base = gdpo_advantages(R, gids, w)
    scaled = R * torch.tensor([1000.0, 0.5, 1.0], dtype=torch.float64) + torch.tensor([5.0, -7.0, 0.0])
    scaled[:, 2] = float("nan")  # a zero-weight reward never matters, even when it applies nowhere
    # group-wise normalisation makes each reward's scale and offset irrelevant (up to eps / group std)
    torch.testing.assert_close(gdpo_advantages(scaled, gids, w), base, rtol=1e-3, atol=1e-3)
    # whitened over the batch: mean 0, Bessel std ~1
    assert abs(base.mean().item()) < 1e-12 and base.std().item() == pytest.approx(1.0, abs=1e-3)
