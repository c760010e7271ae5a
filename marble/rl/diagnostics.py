"""Gradient-cosine diagnostics (docs/algorithm.md §6; MARBLE arXiv 2605.06507 §4.4, Fig. 3).

For a direction d (the applied update, the fresh MGDA direction, the weighted-sum direction) and the
per-reward parameter gradients g_k of a batch: `cos(d, g_k)`, summarised by min, mean and variance over
the rewards. A negative minimum means the update makes some reward worse to first order. Rewards with
a zero (or non-finite) gradient on the batch are excluded (NaN in `per_reward`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from marble.rl.gram import VALID_NORM_MIN, float64_array


class CosineStats(NamedTuple):
    min: float  # min over valid rewards (NaN if none)
    mean: float
    var: float  # population variance over valid rewards
    per_reward: Tensor  # [K] float64, NaN for rewards without a valid gradient


def _summarise(cos: Tensor) -> CosineStats:
    ok = torch.isfinite(cos)
    if not ok.any():
        nan = float("nan")
        return CosineStats(nan, nan, nan, cos)
    v = cos[ok]
    return CosineStats(float(v.min()), float(v.mean()), float(v.var(unbiased=False)), cos)


def direction_cosines(direction: Tensor, grads: Tensor) -> CosineStats:
    """`cos(d, g_k)` for `direction [P]` and `grads [K, P]` (computed in float64)."""
    d = direction.detach().reshape(-1).to(torch.float64)  # [P]
    g = grads.detach().reshape(grads.shape[0], -1).to(torch.float64)  # [K, P]
    g_norm = g.norm(dim=1)  # [K]
    d_norm = d.norm()
    cos = (g @ d) / (g_norm * d_norm)  # [K]
    bad = ~torch.isfinite(g_norm) | (g_norm <= VALID_NORM_MIN) | ~(d_norm > VALID_NORM_MIN)
    return _summarise(torch.where(bad, torch.full_like(cos, float("nan")), cos))


def gram_cosines(gram: Tensor | np.ndarray, gamma: Tensor | np.ndarray) -> CosineStats:
    """The same cosines for `d = Σ_k γ_k g_k`, from the Gram alone:
    `cos(d, g_k) = (G γ)_k / (sqrt(γᵀ G γ) sqrt(G_kk))`. Cheap: no flattened gradients needed.

    Computed in NumPy float64: the trainer calls it on every micro-step, and on a K x K matrix torch's
    per-operation overhead (about 0.5 ms a call in the training loop, measured) is most of the cost."""
    G = float64_array(gram)  # [K, K]
    w = float64_array(gamma)  # [K]
    diag = np.diagonal(G)  # [K]
    g_norm = np.sqrt(np.clip(diag, 0.0, None))  # [K]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d_norm = float(np.sqrt(np.clip(w @ G @ w, 0.0, None)))  # NaN stays NaN, as in torch
        cos = (G @ w) / (g_norm * d_norm)  # [K]
    bad = ~np.isfinite(diag) | (g_norm <= VALID_NORM_MIN) | (not d_norm > VALID_NORM_MIN)
    cos = np.where(bad, np.nan, cos)
    ok = np.isfinite(cos)
    per_reward = torch.from_numpy(cos)
    if not ok.any():
        nan = float("nan")
        return CosineStats(nan, nan, nan, per_reward)
    v = cos[ok]
    return CosineStats(float(v.min()), float(v.mean()), float(v.var()), per_reward)


def combine_directions(gamma: Tensor, grads: Tensor) -> Tensor:
    """`d = Σ_k γ_k g_k` -> `[P]` (float64)."""
    return torch.as_tensor(gamma).to(torch.float64) @ grads.detach().to(torch.float64)
