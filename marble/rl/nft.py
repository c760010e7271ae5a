"""The DiffusionNFT loss per sample, the masked per-reward losses and the affine (ω, ρ) update.

docs/algorithm.md §3. DiffusionNFT (arXiv 2509.16117, Eq. 8; NVlabs/DiffusionNFT `scripts/train_nft_sd3.py`)
trains an implicit positive policy `v_pos = β v + (1-β) sg(v_old)` towards samples with high
optimality probability r and an implicit negative policy `v_neg = (1+β) sg(v_old) - β v` towards the
rest, each an x0-prediction loss with an adaptive, detached per-sample weight.

The per-sample loss `l_i(r) = N_i/β + r (P_i - N_i)/β` is AFFINE in r. Hence for any coefficients γ
(any sign) the combination `Σ_k γ_k ∇L_k` of the masked per-reward losses is the gradient of ONE scalar
`Σ_i [ω_i N_i + ρ_i (P_i - N_i)] / β` with `ω = c γ` and `ρ = (c ⊙ r) γ` (MARBLE, arXiv 2605.06507 §3.3):
a balanced update costs one backward. Coefficients are always applied that way, never by mixing
advantages (clipping is not linear) or by turning NaN into r = 0.5 (not gradient-free).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class NFTTerms(NamedTuple):
    """Per-sample NFT terms of one micro-batch of B samples."""

    P: Tensor  # [B] positive-policy loss, carries the graph to v
    N: Tensor  # [B] negative-policy loss, carries the graph to v
    a: Tensor | None  # [B] float64 |dP_i/dv_i|^2 (detached), None if not requested
    b: Tensor | None  # [B] float64 <dP_i/dv_i, dN_i/dv_i>
    e: Tensor | None  # [B] float64 |dN_i/dv_i|^2
    w_pos: Tensor  # [B] float64 detached adaptive weight of P
    w_neg: Tensor  # [B] float64 detached adaptive weight of N


def _per_sample_mean(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: `[B, ...] -> [B]`."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def nft_terms(
    v: Tensor,
    v_old: Tensor,
    x_t: Tensor,
    x0: Tensor,
    t: Tensor,
    beta: float,
    floor: float = 1e-5,
    output_grads: bool = True,
) -> NFTTerms:
    """Per-sample DiffusionNFT terms P_i, N_i and the output-gradient scalars a_i, b_i, e_i.

    Args:
        v: `[B, ...]` trainable-adapter velocity (with graph).
        v_old: `[B, ...]` old-adapter velocity (detached here).
        x_t: `[B, ...]` noised latent `(1 - t) x0 + t eps`.
        x0: `[B, ...]` clean latent of the rollout.
        t: `[B]` timesteps in (0, 1].
        beta: NFT strength β > 0.
        floor: lower bound of the adaptive weights [NFT: 1e-5].
        output_grads: also compute a, b, e (cheap, O(B D); needed by the output-space Gram).

    The adaptive weights `w = max(mean_D |x0_± - x0|, floor)` are detached and computed in float64
    (DiffusionNFT normalises each sample's loss by its own error scale). P and N are computed in the
    promotion of v's dtype and float32 (so bf16 outputs are upcast).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    B = v.shape[0]
    dtype = torch.promote_types(v.dtype, torch.float32)
    tt = t.reshape(B, *([1] * (v.ndim - 1))).to(dtype)  # [B, 1, ...]
    v_old = v_old.detach().to(dtype)
    vv = v.to(dtype)
    x_t = x_t.detach().to(dtype)
    x0 = x0.detach().to(dtype)

    v_pos = beta * vv + (1.0 - beta) * v_old  # [B, ...]
    v_neg = (1.0 + beta) * v_old - beta * vv  # [B, ...]
    d_pos = x_t - tt * v_pos - x0  # [B, ...] x0_pos - x0
    d_neg = x_t - tt * v_neg - x0  # [B, ...] x0_neg - x0

    with torch.no_grad():
        d_pos64, d_neg64 = d_pos.detach().to(torch.float64), d_neg.detach().to(torch.float64)  # reused below
        w_pos = _per_sample_mean(d_pos64.abs()).clamp_min(floor)  # [B]
        w_neg = _per_sample_mean(d_neg64.abs()).clamp_min(floor)  # [B]
    P = _per_sample_mean(d_pos**2) / w_pos.to(dtype)  # [B]
    N = _per_sample_mean(d_neg**2) / w_neg.to(dtype)  # [B]

    a = b = e = None
    if output_grads:
        with torch.no_grad():
            D = d_pos[0].numel()
            t64 = t.detach().to(torch.float64).reshape(B, 1)  # [B, 1]
            # dP_i/dv_i = -(2 β t_i / (D w_pos)) (x0_pos - x0); dN_i/dv_i = +(2 β t_i / (D w_neg)) (x0_neg - x0)
            p = -(2 * beta * t64 / (D * w_pos[:, None])) * d_pos64.reshape(B, -1)
            q = (2 * beta * t64 / (D * w_neg[:, None])) * d_neg64.reshape(B, -1)
            a = (p * p).sum(1)  # [B]
            b = (p * q).sum(1)  # [B]
            e = (q * q).sum(1)  # [B]
    return NFTTerms(P=P, N=N, a=a, b=b, e=e, w_pos=w_pos, w_neg=w_neg)


def reward_weights(mask: Tensor, clip_max: float) -> Tensor:
    """Masked per-sample weights `c[i, k] = C m[i, k] / max(1, Σ_j m[j, k])` (docs/algorithm.md §3).

    Each reward's loss is the mean over the samples it applies to, times C (DiffusionNFT multiplies the
    policy loss by `adv_clip_max`). Returns `[B, K]` float64.
    """
    m = mask.to(torch.float64)  # [B, K]
    return clip_max * m / m.sum(0).clamp_min(1.0)  # [B, K]


def combine_coefficients(gamma: Tensor, c: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """(ω, ρ) of the affine identity: `ω_i = Σ_k γ_k c[i,k]`, `ρ_i = Σ_k γ_k c[i,k] r[i,k]`.

    Entries with c = 0 (masked) never touch r, so a placeholder or NaN r there is harmless.
    Returns `omega [B]`, `rho [B]` float64, detached.
    """
    c64 = c.detach().to(torch.float64)  # [B, K]
    g = torch.as_tensor(gamma).detach().to(device=c64.device, dtype=torch.float64)  # [K]
    cr = torch.where(c64 != 0, c64 * r.detach().to(torch.float64), torch.zeros_like(c64))  # [B, K]
    return c64 @ g, cr @ g  # [B], [B]


def combined_loss(terms: NFTTerms, omega: Tensor, rho: Tensor, beta: float) -> Tensor:
    """`Σ_i [ω_i N_i + ρ_i (P_i - N_i)] / β`: its gradient is `Σ_k γ_k ∇L_k` (one backward)."""
    dt = terms.P.dtype
    return (omega.to(dt) * terms.N + rho.to(dt) * (terms.P - terms.N)).sum() / beta


def per_reward_losses(terms: NFTTerms, c: Tensor, r: Tensor, beta: float) -> Tensor:
    """Masked per-reward losses `L_k = Σ_i c[i,k] (r[i,k] P_i + (1 - r[i,k]) N_i) / β` -> `[K]`.

    Used for the parameter-space Gram (one backward each) and for logging; training applies the
    balanced combination through `combined_loss`.
    """
    dt = terms.P.dtype
    c_ = c.detach().to(dt)  # [B, K]
    r_ = torch.where(c_ != 0, r.detach().to(dt), torch.zeros_like(c_))  # [B, K]
    per_sample = r_ * terms.P[:, None] + (1 - r_) * terms.N[:, None]  # [B, K]
    return (c_ * per_sample).sum(0) / beta  # [K]


def kl_loss(v: Tensor, v_ref: Tensor) -> Tensor:
    """`mean_i mean_D (v_i - v_ref_i)^2`: the KL to the reference, added once (weight λ), never balanced."""
    diff = v.to(torch.promote_types(v.dtype, torch.float32)) - v_ref.detach().to(
        torch.promote_types(v.dtype, torch.float32)
    )
    return _per_sample_mean(diff**2).mean()
