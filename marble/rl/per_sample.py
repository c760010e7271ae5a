"""Every reward's parameter gradient from ONE backward: per-sample gradients of the trained Linear layers.

Why one backward suffices for the NFT loss (docs/algorithm.md §4.1): the per-reward loss is
`L_k = Σ_i c_ik (r_ik P_i + (1 - r_ik) N_i) / β`, so `∇L_k = Σ_i J_iᵀ c_ik (r_ik p_i + (1 - r_ik) q_i) / β`
with `p_i = dP_i/dv_i`, `q_i = dN_i/dv_i` (`nft.nft_terms`) and J_i the Jacobian of sample i's velocity.
`p_i - κ_i q_i` is `2 β t_i (v_i - v_old,i)`-small (the old adapter is an EMA blend of the trained
one, a little behind it: the residual was at most 1.7e-4 in the committed alignment runs), so with
`κ_i = <p_i, q_i> / |q_i|²`:
`∇L_k = Σ_i s_ik u_i`, `s_ik = c_ik (r_ik κ_i + 1 - r_ik) / β`, `u_i = J_iᵀ q_i`.
The backward of `Σ_i N_i` computes every `u_i` on its way; a Linear layer's per-sample weight gradient
is `Σ_tokens δ_i ⊗ x_i` (its output gradient times its input, the identity Opacus and the ghost-norm
methods use), so scaling δ_i by `s_ik` before that sum gives reward k's gradient of the layer: K small
einsums per trained layer (LoRA's are rank-r wide), no K backward passes.

`collinearity_residual` reports how far p_i is from κ_i q_i (0: exact).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from marble.rl.nft import NFTTerms


def per_sample_coefficients(terms: NFTTerms, c: Tensor, r: Tensor, beta: float) -> Tensor:
    """`s [B, K]` float64 with `∇L_k = Σ_i s_ik J_iᵀ q_i` (masked entries 0, whatever r holds there)."""
    if terms.b is None or terms.e is None:
        raise ValueError("per_sample_coefficients needs nft_terms(..., output_grads=True)")
    c64 = c.detach().to(torch.float64)  # [B, K]
    r64 = torch.where(c64 != 0, r.detach().to(torch.float64), torch.zeros_like(c64))  # [B, K]
    kappa = torch.where(terms.e > 0, terms.b / terms.e.clamp_min(1e-300), torch.zeros_like(terms.e))  # [B]
    return c64 * (r64 * kappa[:, None] + 1 - r64) / beta  # [B, K]


def collinearity_residual(terms: NFTTerms) -> Tensor:
    """`[B]` |p_i - κ_i q_i| / |p_i|: the relative error of writing sample i's gradients as multiples of
    u_i (0 when the trained and old adapters agree; NaN when p_i = 0)."""
    if terms.a is None or terms.b is None or terms.e is None:
        raise ValueError("collinearity_residual needs nft_terms(..., output_grads=True)")
    resid2 = (terms.a - terms.b**2 / terms.e.clamp_min(1e-300)).clamp_min(0)  # [B]
    return (resid2 / terms.a).sqrt()


class PerRewardLinearGrads:
    """Hooks on the trained Linear layers that turn ONE backward of `Σ_i N_i` into K per-reward gradients.

    `modules`: the `nn.Linear` layers whose weight is trained (LoRA's `lora_A` / `lora_B`); each must
    have no trained bias (LoRA's have none). Use:

        with grads.capture():
            v = model(...)            # the forward with a graph (captured); no-grad forwards are skipped
            terms = nft_terms(v, ...)
            grads.coefficients = per_sample_coefficients(terms, c, r, beta)  # [B, K]
            torch.autograd.grad(terms.N.sum(), ...)  # or any backward reaching the layers
        grads.stacked()  # [K, P]
    """

    def __init__(self, modules: list[nn.Linear]) -> None:
        for m in modules:
            if m.bias is not None and m.bias.requires_grad:
                raise ValueError(f"PerRewardLinearGrads: trained bias in {m} is not supported")
        self.modules = list(modules)
        self.per_reward: dict[nn.Linear, Tensor] = {}
        self.coefficients: Tensor | None = None  # [B, K], read when the backward reaches a layer
        self._coefficients_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self.seconds = 0.0  # wall time spent in the per-reward hooks since the last capture()
        self._handles: list[Any] = []

    @classmethod
    def of_trained(cls, model: nn.Module) -> PerRewardLinearGrads:
        """The Linear layers of `model` whose weight requires grad; refuses other trained parameters."""
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
        covered = {id(m.weight) for m in linears}
        other = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if other:
            raise ValueError(f"per-sample Gram: trained parameters outside Linear weights: {other[:3]}")
        return cls(linears)

    @contextmanager
    def capture(self) -> Iterator[PerRewardLinearGrads]:
        """Capture the next forward with a graph and its backward, which scales sample i's output gradient
        by `coefficients[i]` (set them between the two)."""
        self.coefficients = None
        self.per_reward = {}
        self._coefficients_cache = {}
        self.seconds = 0.0
        self._handles = [m.register_forward_hook(self._forward_hook) for m in self.modules]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []

    def _forward_hook(self, module: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not output.requires_grad or module in self.per_reward:
            return
        x = inputs[0].detach()  # [B, ..., in]

        def on_grad(gy: Tensor) -> None:  # gy [B, ..., out]
            if self.coefficients is None:  # a backward before the coefficients are known: no gradient
                return
            t0 = time.perf_counter()
            B = gy.shape[0]
            dt = torch.promote_types(gy.dtype, torch.float32)  # bf16 is upcast; the Gram is float64 later
            g = gy.reshape(B, -1, gy.shape[-1])  # [B, T, out]
            xx = x.reshape(B, -1, x.shape[-1])  # [B, T, in]
            if g.dtype != dt or xx.dtype != dt:
                g, xx = g.to(dt), xx.to(dt)
            per_sample = torch.bmm(g.transpose(1, 2), xx).reshape(B, -1)  # [B, out*in]
            self.per_reward[module] = torch.mm(self._coefficients_t(g.device, dt), per_sample)  # [K, out*in]
            self.seconds += time.perf_counter() - t0

        self.per_reward[module] = torch.empty(0)  # placeholder: the first graph forward only
        output.register_hook(on_grad)

    def _coefficients_t(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """`coefficients.T` `[K, B]` on the layer's device and dtype, converted once per backward (every
        trained layer reads it)."""
        key = (device, dtype)
        if key not in self._coefficients_cache:
            self._coefficients_cache[key] = (
                self.coefficients.detach().to(device=device, dtype=dtype).T.contiguous()
            )
        return self._coefficients_cache[key]

    def stacked(self) -> Tensor:
        """`[K, P]` (float32, or float64 for a float64 model): every reward's gradient, flattened over the
        modules in order."""
        missing = [m for m in self.modules if self.per_reward.get(m, torch.empty(0)).numel() == 0]
        if missing:
            raise RuntimeError(f"per-sample Gram: {len(missing)} trained layers got no gradient")
        return torch.cat([self.per_reward[m] for m in self.modules], 1)
