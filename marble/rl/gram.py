"""Gram matrices of the per-reward gradients (docs/algorithm.md §4.1) and their normalisation (§4.2).

Three sources:
- `params` (exact, MARBLE arXiv 2605.06507 §3.2): K backward passes of the masked per-reward losses
  with a retained graph, gradients flattened over the trainable parameters, non-finite entries zeroed,
  optionally all-reduced across ranks, `G_kl = <g_k, g_l>` accumulated in float64.
- `output` (ours, MGDA-UB style, Sener & Koltun 2018 §3.3): gradients with respect to the model output,
  from three detached scalars per sample (`nft.nft_terms`). No backward; ignores the coupling of samples
  through the parameters, so it approximates the `params` Gram.
- `per_sample` (ours, `per_sample.py`): the `params` Gram from ONE backward, through per-sample
  gradients of the trained Linear layers; exact up to the collinearity residual of the NFT output
  gradients (at most 1.7e-4 in the committed alignment runs, docs/algorithm.md §4.1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from marble.rl.nft import NFTTerms

VALID_NORM_MIN = 1e-12
"""A reward whose gradient norm is not finite or not above this is invalid (weight 0), §4.2."""

# Columns of the stacked gradients per float64 Gram chunk: bounds the float64 copy; small chunks stay in
# the CPU cache (measured 4x faster than 2^20 on this machine), large ones save kernel launches on GPU.
_CHUNK_CPU, _CHUNK_GPU = 1 << 14, 1 << 22


class ParamGram(NamedTuple):
    gram: Tensor  # [K, K] float64
    norms: Tensor  # [K] float64 = sqrt(diag(gram))
    grads: Tensor | None  # [K, P] flattened gradients (param dtype), only if keep_grads
    nonfinite: Tensor  # [K] number of non-finite gradient entries that were zeroed


def stacked_gram(grads: Tensor) -> Tensor:
    """`G = grads gradsᵀ` accumulated in float64, chunked over columns (bounded float64 copies)."""
    K, P = grads.shape
    G = torch.zeros(K, K, dtype=torch.float64, device=grads.device)
    chunk = _CHUNK_CPU if grads.device.type == "cpu" else _CHUNK_GPU
    for start in range(0, P, chunk):
        block = grads[:, start : start + chunk].to(torch.float64)  # [K, chunk]
        G += block @ block.T
    return G


def flat_grads(loss: Tensor, params: Sequence[Tensor], retain_graph: bool = True) -> Tensor:
    """Gradient of a scalar `loss` w.r.t. the trainable `params` (those with `requires_grad`, the same
    selection and order as `gram_from_params`), flattened to `[P]`; unused params give zeros."""
    params = [p for p in params if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
    )


def gram_from_params(
    losses: Tensor | Sequence[Tensor],
    params: Sequence[Tensor],
    *,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    keep_grads: bool = False,
    retain_graph: bool = True,
) -> ParamGram:
    """Exact Gram of the per-reward parameter gradients: K backward passes with a retained graph.

    Args:
        losses: `[K]` per-reward losses of the micro-batch (`nft.per_reward_losses`), or a list of K scalars.
        params: the trainable parameters (only those with `requires_grad` are used).
        all_reduce: optional hook applied to the stacked gradients `[K, P]` before the Gram, e.g.
            `lambda g: accelerator.reduce(g, "mean")`. Reducing the gradients (not the local Grams) makes
            the Gram that of the global gradient, identical on every rank, so the QP agrees everywhere.
        keep_grads: return the stacked gradients (for the cosine diagnostics).
        retain_graph: keep the graph after the last pass (True: the trainer still backprops the
            combined loss through it).

    `.grad` of the parameters is not touched (torch.autograd.grad), so gradient accumulation of the
    training backward is unaffected. Non-finite gradient entries are zeroed and counted.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("gram_from_params: no trainable parameters")
    K = len(losses)
    sizes = [p.numel() for p in params]
    dtypes = {p.dtype for p in params}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32  # mixed precision params: float32 rows
    # one [K, P] buffer filled in place: no per-pass torch.cat and no torch.stack copy
    grads = torch.empty(K, sum(sizes), dtype=dtype, device=params[0].device)  # [K, P]
    for k in range(K):
        if not losses[k].requires_grad:  # a loss with no path to the parameters: zero gradient
            grads[k].zero_()
            continue
        keep = retain_graph or k < K - 1
        gs = torch.autograd.grad(losses[k], params, retain_graph=keep, allow_unused=True)
        for view, g in zip(torch.split(grads[k], sizes), gs, strict=True):
            if g is None:
                view.zero_()
            else:
                view.copy_(g.reshape(-1))
    return gram_of_grads(grads, all_reduce=all_reduce, keep_grads=keep_grads)


def gram_of_grads(
    grads: Tensor, *, all_reduce: Callable[[Tensor], Tensor] | None = None, keep_grads: bool = False
) -> ParamGram:
    """The `ParamGram` of stacked per-reward gradients `[K, P]`: non-finite entries zeroed and counted,
    then the optional all-reduce (see `gram_from_params`), then `G = grads gradsᵀ` in float64."""
    K = grads.shape[0]
    nonfinite = torch.zeros(K, dtype=torch.float64, device=grads.device)  # [K]
    # Fast check (one reduction, no [K, P] mask): a row sum is finite when every entry is (or a finite
    # row overflowed, which then also takes the exact path).
    if not bool(torch.isfinite(grads.sum(1)).all()):
        finite = torch.isfinite(grads)  # [K, P]
        nonfinite = (~finite).sum(1).to(torch.float64)
        grads = torch.where(finite, grads, torch.zeros_like(grads))
    if all_reduce is not None:
        grads = all_reduce(grads)
    G = stacked_gram(grads)  # [K, K]
    norms = torch.diagonal(G).clamp_min(0).sqrt()  # [K]
    return ParamGram(gram=G, norms=norms, grads=grads if keep_grads else None, nonfinite=nonfinite)


def gram_from_output(terms: NFTTerms, c: Tensor, r: Tensor, beta: float) -> Tensor:
    """Output-space Gram `H [K, K]` (float64) from the three scalars a, b, e per sample (§4.1, ours).

    The output gradient of L_k at sample i is `c_ik (r_ik p_i + (1 - r_ik) n_i) / β`, so with
    `U = c ⊙ r` and `S = c ⊙ (1 - r)` (`[B, K]`):
    `H = (Uᵀ diag(a) U + Uᵀ diag(b) S + Sᵀ diag(b) U + Sᵀ diag(e) S) / β²`,
    which expands to the spec's `Σ_i c_k c_l [r_k r_l a + (r_k + r_l - 2 r_k r_l) b + (1-r_k)(1-r_l) e]/β²`.
    Cost O(B K²). For DDP, sum H over ranks (samples are independent in output space).
    """
    if terms.a is None or terms.b is None or terms.e is None:
        raise ValueError("gram_from_output needs nft_terms(..., output_grads=True)")
    c64 = c.detach().to(torch.float64)  # [B, K]
    r64 = torch.where(c64 != 0, r.detach().to(torch.float64), torch.zeros_like(c64))  # [B, K]
    U = c64 * r64  # [B, K]
    S = c64 - U  # [B, K] = c (1 - r)
    a, b, e = (x.to(torch.float64)[:, None] for x in (terms.a, terms.b, terms.e))  # [B, 1] each
    UbS = U.T @ (b * S)  # [K, K]
    H = U.T @ (a * U) + UbS + UbS.T + S.T @ (e * S)  # [K, K]
    return H / beta**2


class NormalizedGram(NamedTuple):
    gram_hat: np.ndarray  # [K, K] float64, Ĝ_kl = G_kl / (|g_k||g_l|) on valid pairs, 0 elsewhere
    norms: np.ndarray  # [K] float64 gradient norms (NaN where the diagonal was not finite)
    valid: np.ndarray  # [K] bool: finite norm > VALID_NORM_MIN


def float64_array(x: Tensor | np.ndarray) -> np.ndarray:
    """A tensor or array as a float64 NumPy array on the CPU (K x K work is cheaper in NumPy than in
    torch's small operations); may share memory with `x`."""
    if isinstance(x, Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def as_gram(gram: Tensor | np.ndarray) -> np.ndarray:
    """A float64 NumPy copy of a square Gram (the caller's matrix is never touched)."""
    G = np.array(float64_array(gram))  # [K, K]
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"Gram must be square [K, K], got shape {G.shape}")
    return G


def gram_norms(gram: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(norms `[K]`, valid `[K]`) of a Gram's gradients: `|g_k| = sqrt(G_kk)` (NaN where the diagonal
    is not finite), valid when finite and above `VALID_NORM_MIN` (§4.2). What γ's rescaling needs of
    the batch it is applied to, without normalising the whole matrix."""
    diag = np.diag(as_gram(gram))  # [K] (a view of the copy)
    with np.errstate(invalid="ignore"):
        norms = np.where(np.isfinite(diag), np.sqrt(np.clip(diag, 0.0, None)), np.nan)  # [K]
    return norms, np.isfinite(norms) & (norms > VALID_NORM_MIN)


def normalize_gram(gram: Tensor | np.ndarray) -> NormalizedGram:
    """Normalise a Gram to unit-norm gradients and flag the valid rewards (§4.2)."""
    G = as_gram(gram)  # [K, K]
    norms, valid = gram_norms(G)  # [K], [K]
    safe = np.where(valid, norms, 1.0)  # [K]
    G_hat = np.where(np.outer(valid, valid), G / np.outer(safe, safe), 0.0)  # [K, K]
    return NormalizedGram(gram_hat=G_hat, norms=norms, valid=valid)
