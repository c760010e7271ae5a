"""Per-reward group advantages and the optimality probability r (docs/algorithm.md §2).

MARBLE's first idea (arXiv 2605.06507 §3): one advantage estimator per reward. Each column of the
reward matrix is standardised on its own, over the entries where that reward applies (NaN elsewhere),
so a specialist reward that applies to a third of the prompts is neither diluted nor inflated by the
others. The per-prompt statistic follows DiffusionNFT's per-prompt stat tracker
(NVlabs/DiffusionNFT, `flow_grpo/stat_tracking.py`): group mean, global (default) or per-group std.

Everything here works on whole gathered tensors (call it after an all-gather in multi-process runs):
no state survives between epochs.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

StdMode = Literal["global", "group"]


class AdvantageStats(NamedTuple):
    """Per-reward statistics of one epoch batch, each `[K]` float64 (counts as float for logging)."""

    mean: Tensor  # [K] mean of the valid raw rewards (NaN when none is valid)
    valid_frac: Tensor  # [K] fraction of samples where the reward applies
    adv_std: Tensor  # [K] std of the finite advantages
    reward_std: Tensor  # [K] global std of the valid raw rewards (the global-mode denominator)
    zero_std_groups: Tensor  # [K] groups with >= 1 valid entry whose valid rewards are all equal


class AdvantageResult(NamedTuple):
    adv: Tensor  # [N, K] float64, NaN where the reward does not apply
    stats: AdvantageStats


def _group_index(group_ids: Tensor | list) -> tuple[Tensor, int]:
    """Map arbitrary group labels to 0..G-1. Returns (index [N] long, G)."""
    ids = torch.as_tensor(group_ids)
    if ids.dtype.is_floating_point:
        raise TypeError("group_ids must be integer labels, got a floating point tensor")
    _, inverse = torch.unique(ids, return_inverse=True)
    return inverse.reshape(-1), int(inverse.max().item()) + 1 if inverse.numel() else 0


def _group_sums(values: Tensor, index: Tensor, num_groups: int) -> Tensor:
    """Sum rows of `values [N, K]` per group -> `[G, K]`."""
    out = values.new_zeros(num_groups, values.shape[1])
    return out.index_add_(0, index, values)


def group_advantages(
    rewards: Tensor, group_ids: Tensor | list, std_mode: StdMode = "global", eps: float = 1e-4
) -> AdvantageResult:
    """Per-reward, per-prompt-group advantages.

    `A[i, k] = (R[i, k] - mean_{j in group(i), valid} R[j, k]) / (std_k + eps)` where std_k is the
    population std of all valid `R[:, k]` (global, DiffusionNFT's default) or of the valid entries of
    the group (per-group). NaN (reward does not apply) stays NaN; a group with a single valid entry
    gets advantage 0 for it. Computed in float64.

    Args:
        rewards: `[N, K]` raw rewards, NaN = not applicable (non-finite values are treated as NaN).
        group_ids: `[N]` integer label of each sample's prompt group.
        std_mode: "global" or "group".
        eps: added to the std [NFT: 1e-4].
    """
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [N, K], got shape {tuple(rewards.shape)}")
    if std_mode not in ("global", "group"):
        raise ValueError(f"std_mode must be 'global' or 'group', got {std_mode!r}")
    R = rewards.detach().to(torch.float64)  # [N, K]
    n, _ = R.shape
    index, num_groups = _group_index(group_ids)
    if index.numel() != n:
        raise ValueError(f"group_ids has {index.numel()} entries but rewards has {n} rows")
    index = index.to(R.device)

    valid = torch.isfinite(R)  # [N, K]
    Rz = torch.where(valid, R, torch.zeros_like(R))  # [N, K] NaN-free for sums
    g_count = _group_sums(valid.to(torch.float64), index, num_groups)  # [G, K]
    g_mean = _group_sums(Rz, index, num_groups) / g_count.clamp_min(1.0)  # [G, K]
    centered = torch.where(valid, Rz - g_mean[index], torch.zeros_like(R))  # [N, K]
    g_var = _group_sums(centered**2, index, num_groups) / g_count.clamp_min(1.0)  # [G, K]
    mean, reward_std, count = _valid_mean_std(R, valid)  # [K] each

    if std_mode == "global":
        denom = (reward_std + eps).expand_as(R)  # [N, K]
    else:
        denom = g_var.sqrt()[index] + eps  # [N, K]
    adv = torch.where(valid, centered / denom, torch.full_like(R, float("nan")))  # [N, K]

    # "all equal" up to the rounding of the group mean (sum / count is not exact)
    flat = g_var.sqrt() <= 1e-12 * (g_mean.abs() + 1.0)  # [G, K]
    stats = AdvantageStats(
        mean=torch.where(count > 0, mean, torch.full_like(mean, float("nan"))),
        valid_frac=count / max(n, 1),
        adv_std=_valid_mean_std(adv, valid)[1],
        reward_std=reward_std,
        zero_std_groups=((g_count > 0) & flat).to(torch.float64).sum(0),
    )
    return AdvantageResult(adv=adv, stats=stats)


def _valid_mean_std(x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-column mean, population std and count of the `valid` entries of `x` `[N, K]` (0 where a
    column has none)."""
    count = valid.to(x.dtype).sum(0)  # [K]
    xz = torch.where(valid, x, torch.zeros_like(x))  # [N, K]
    mean = xz.sum(0) / count.clamp_min(1.0)  # [K]
    dev = torch.where(valid, xz - mean, torch.zeros_like(x))  # [N, K]
    return mean, ((dev**2).sum(0) / count.clamp_min(1.0)).sqrt(), count


def optimality_probability(adv: Tensor, clip_max: float) -> tuple[Tensor, Tensor]:
    """Map advantages to DiffusionNFT's optimality probability (docs/algorithm.md §2).

    `r = clip(A / C, -1, 1) / 2 + 1/2` and `m = isfinite(A)`. Where the mask is 0 the returned r is a
    placeholder (0.5) that must never reach the loss: `reward_weights` gives those entries c = 0, and
    `combine_coefficients` never multiplies it in. (Using r = 0.5 as a value would NOT be gradient-free.)

    Returns:
        r: `[N, K]` float64 in [0, 1]; mask: `[N, K]` bool.
    """
    if clip_max <= 0:
        raise ValueError(f"clip_max must be > 0, got {clip_max}")
    A = adv.to(torch.float64)  # [N, K]
    mask = torch.isfinite(A)  # [N, K]
    r = torch.clamp(A / clip_max, -1.0, 1.0) / 2 + 0.5  # [N, K]
    r = torch.where(mask, r, torch.full_like(r, 0.5))
    return r, mask


def gdpo_advantages(rewards: Tensor, group_ids: Tensor | list, weights: Tensor, eps: float = 1e-4) -> Tensor:
    """GDPO's single advantage per sample (Liu et al., arXiv 2601.05242, §3; NVlabs/GDPO releases it
    for TRL and verl): normalise each reward within its prompt group, take the weighted SUM of the
    per-reward advantages, then whiten that sum over the whole batch.

    `A_k = (R_k - group mean) / (group std + eps)` (`group_advantages(std_mode="group")`, valid entries
    only); `S_i = Σ_{k applies to i} w_k A_ik`; `A_i = (S_i - mean S) / (std S + eps)` with the mean and
    the Bessel-corrected std (the reference code's `torch.std`) over the samples where S is defined.

    NaN (a reward that does not apply) is explicit: it is left out of its group's statistics and adds
    nothing to `S_i`; a sample where no reward with `w_k > 0` applies gets NaN (mask 0: no gradient),
    and is left out of the whitening. The reference code instead turns NaN into a reward of 0 before
    the group statistics and keeps such samples at `S = 0` in the whitening; in marble a reward applies
    to whole prompt groups, where both rules give the same per-reward advantage (0).
    The group std is the population std: with whole groups of equal size the reference code's Bessel
    factor is one constant per reward, which the batch whitening removes.

    Args:
        rewards: `[N, K]` raw rewards, NaN = not applicable.
        group_ids: `[N]` prompt-group label of each sample.
        weights: `[K]` non-negative reward weights w_k.
        eps: added to both stds [GDPO: 1e-4].
    Returns `[N, 1]` float64.
    """
    R = rewards.detach().to(torch.float64)  # [N, K]
    w = torch.as_tensor(weights, dtype=torch.float64, device=R.device)  # [K]
    if w.shape != (R.shape[1],):
        raise ValueError(f"gdpo: {w.numel()} weights for {R.shape[1]} rewards")
    adv = group_advantages(R, group_ids, std_mode="group", eps=eps).adv  # [N, K]
    use = torch.isfinite(adv) & (w > 0)  # [N, K]
    S = torch.where(use, adv * w, torch.zeros_like(adv)).sum(1)  # [N]
    defined = use.any(1)  # [N]
    n = int(defined.sum())
    out = torch.full_like(S, float("nan"))
    if n:
        s = S[defined]
        std = float(s.std(unbiased=True)) if n > 1 else 0.0
        out[defined] = (s - s.mean()) / (std + eps)
    return out[:, None]  # [N, 1]
