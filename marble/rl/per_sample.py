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
methods use), so weighting those per-sample gradients by `s_ik` gives reward k's gradient of the layer:
one batched product per layer and a `[K, B]` one (LoRA's layers are rank-r wide), no K backward passes.
The backward need not reach the weights at all: it stops at the layers' outputs (their δ_i).

`collinearity_residual` reports how far p_i is from κ_i q_i (0: exact).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

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
    """Records the trained Linear layers' calls so that ONE backward of `Σ_i N_i` gives K per-reward
    gradients.

    `modules`: the `nn.Linear` layers whose weight is trained (LoRA's `lora_A` / `lora_B`); each must
    have no trained bias (LoRA's have none). Use:

        with grads.capture():
            v = model(...)            # the forward with a graph (captured); no-grad forwards are skipped
        terms = nft_terms(v, ...)
        s = per_sample_coefficients(terms, c, r, beta)  # [B, K]
        g = grads.per_reward_grads(terms.N.sum(), s)    # [K, P]: uses, then drops, what was captured

    Recording is on only while `capture()` is open, and only for the forward inside it (the trained
    policy's): the old policy's, the reference's and the sampler's forwards run untouched. It wraps
    each layer's `forward` on the instance (as accelerate's module hooks do) rather than registering a
    forward hook: a registered hook sends every call of the layer through torch's slower hooked
    module-call path.

    The backward runs to the captured layer OUTPUTS (`torch.autograd.grad`), not to the weights: it
    forms no weight gradient (the per-reward ones replace it) and calls no Python hook per layer. The
    per-sample products run one batched product per call, written into one buffer per group of calls
    of one shape (up to `group_bytes` of per-sample gradients; a layer larger than that runs alone),
    and each group is weighted per reward by one product, so a model of many small layers pays one
    `[K, B]` product per group, not per layer.
    """

    def __init__(self, modules: list[nn.Linear], group_bytes: int = 64 * 2**20) -> None:
        for m in modules:
            if m.bias is not None and m.bias.requires_grad:
                raise ValueError(f"PerRewardLinearGrads: trained bias in {m} is not supported")
        self.modules = list(modules)
        self.group_bytes = int(group_bytes)
        self.sizes = [m.weight.numel() for m in self.modules]
        self.offsets = [sum(self.sizes[:j]) for j in range(len(self.sizes))]
        self.num_params = sum(self.sizes)
        # per call with a graph: (module index, input, the output's gradient edge). The edge, not the
        # output: holding LoRA-B outputs (full hidden width) until the backward would add their memory
        self._uses: list[tuple[int, Tensor, GradientEdge]] = []
        self._columns: dict[tuple[int, ...], Tensor] = {}  # a chunk's layers -> their columns of [K, P]
        self.seconds = 0.0  # wall time of the per-reward products of the last per_reward_grads()
        self._recording = False

    @classmethod
    def of_trained(cls, model: nn.Module, group_bytes: int = 64 * 2**20) -> PerRewardLinearGrads:
        """The Linear layers of `model` whose weight requires grad; refuses other trained parameters."""
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
        covered = {id(m.weight) for m in linears}
        other = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if other:
            raise ValueError(f"per-sample Gram: trained parameters outside Linear weights: {other[:3]}")
        return cls(linears, group_bytes)

    @contextmanager
    def capture(self) -> Iterator[PerRewardLinearGrads]:
        """Record the input and output gradient edge of every trained layer's calls with a graph made
        inside the block (a new capture drops an earlier one that `per_reward_grads` did not use)."""
        if self._recording:
            raise RuntimeError("PerRewardLinearGrads.capture() is already open")
        self._uses = []
        self.seconds = 0.0
        # the layer's own instance-level forward, if something (accelerate) already wrapped it
        previous = [m.__dict__.get("forward") for m in self.modules]
        self._recording = True
        try:
            for j, m in enumerate(self.modules):  # the instance dict directly: nn.Module.__setattr__'s
                m.__dict__["forward"] = self._recorder(j, m)  # checks cost more than the forward's calls
            yield self
        finally:
            for m, prev in zip(self.modules, previous, strict=True):
                if prev is None:
                    m.__dict__.pop("forward", None)
                else:
                    m.__dict__["forward"] = prev
            self._recording = False

    def _recorder(self, j: int, module: nn.Linear) -> Any:
        """`module`'s forward, recording (layer index, input, the output's gradient edge) of each call
        with a graph (a no-grad call has nothing to differentiate)."""
        inner = module.forward  # bound: the class's forward, or an instance-level wrapper

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            out = inner(x, *args, **kwargs)
            if out.requires_grad:
                self._uses.append((j, x.detach(), get_gradient_edge(out)))
            return out

        return forward

    def per_reward_grads(
        self, root: Tensor, coefficients: Tensor, *, retain_graph: bool = False, out: Tensor | None = None
    ) -> Tensor:
        """`[K, P]` (float32, or float64 for a float64 model; P over `modules` in order): reward k's
        gradient `Σ_i coefficients[i, k] ∇_i`, with ∇_i sample i's gradient of the scalar `root`
        (the `Σ_i N_i` of the captured forward). A layer called more than once sums its calls. With
        `out`, the gradients are added to it in place (and it is returned)."""
        uses, self._uses = self._uses, []  # the captured inputs are freed with this call's operands
        if not uses:
            raise RuntimeError(
                f"per-sample Gram: {len(self.modules)} trained layers got no gradient "
                "(no forward with a graph was captured)"
            )
        deltas = torch.autograd.grad(
            root, [edge for _, _, edge in uses], retain_graph=retain_graph, allow_unused=True
        )
        t0 = time.perf_counter()
        calls = [(j, x, d) for (j, x, _), d in zip(uses, deltas, strict=True) if d is not None]
        reached = {j for j, _, _ in calls}
        if len(reached) < len(self.modules):
            raise RuntimeError(
                f"per-sample Gram: {len(self.modules) - len(reached)} trained layers got no gradient"
            )
        dtype = torch.promote_types(calls[0][2].dtype, torch.float32)  # bf16 upcast; the Gram is float64
        device = calls[0][2].device
        if out is None:
            out = torch.zeros(coefficients.shape[1], self.num_params, dtype=dtype, device=device)
        coef_t = coefficients.detach().to(device=device, dtype=dtype).T.contiguous()  # [K, B]
        for chunk in self._chunks(calls):
            # a chunk's columns repeat only for a layer called twice in it; otherwise each element gets
            # one add, so CUDA's atomic index_add_ cannot reorder a sum
            columns = self._chunk_columns(tuple(j for j, _, _ in chunk), device)
            out.index_add_(1, columns, self._chunk_grads(chunk, coef_t, dtype))
        self.seconds = time.perf_counter() - t0
        return out

    def _chunks(self, calls: list[tuple[int, Tensor, Tensor]]) -> Iterator[list[tuple[int, Tensor, Tensor]]]:
        """Calls grouped by operand shape, each group cut into chunks whose per-sample gradients take at
        most `group_bytes`."""
        groups: dict[tuple, list[tuple[int, Tensor, Tensor]]] = {}
        for j, x, d in calls:
            groups.setdefault((x.shape, d.shape, x.dtype, d.dtype), []).append((j, x, d))
        for group in groups.values():
            x, d = group[0][1], group[0][2]
            itemsize = torch.promote_types(d.dtype, torch.float32).itemsize
            per_call = d.shape[0] * x.shape[-1] * d.shape[-1] * itemsize  # [B, out, in] of one call
            n = max(1, self.group_bytes // max(per_call, 1))
            for start in range(0, len(group), n):
                yield group[start : start + n]

    def _chunk_grads(
        self, chunk: list[tuple[int, Tensor, Tensor]], coef_t: Tensor, dtype: torch.dtype
    ) -> Tensor:
        """`[K, L * out * in]`: the per-reward gradients of a chunk's L calls, call after call."""
        B = chunk[0][2].shape[0]
        n_in, n_out = chunk[0][1].shape[-1], chunk[0][2].shape[-1]
        L, K = len(chunk), coef_t.shape[0]
        # Σ_tokens δ ⊗ x per sample (the Linear weight gradient of one sample), one batched product per
        # call written into one buffer, then weighted per reward by one product for the chunk. The
        # operands are read where they are: on CPU, stacking them into one tensor first cost as much as
        # the products. The narrow side (LoRA's rank) is the rows of each product: on CPU that was 3-4x
        # faster for the LoRA-B calls (out = hidden, in = rank) of the tiny world than the [out, in]
        # orientation; the transpose back is of the small [K, out, in] result only.
        rank_rows = n_out <= n_in
        shape = (L, B, n_out, n_in) if rank_rows else (L, B, n_in, n_out)
        per_sample = torch.empty(shape, dtype=dtype, device=coef_t.device)
        for buf, (_, x, d) in zip(per_sample, chunk, strict=True):
            # [B, T, in|out]; a call's operands are usually that already, and a no-op reshape or `.to`
            # still costs a dispatch each (a quarter of the products' time on the tiny world's calls)
            xm = x if x.dim() == 3 and x.dtype == dtype else x.reshape(B, -1, n_in).to(dtype)
            dm = d if d.dim() == 3 and d.dtype == dtype else d.reshape(B, -1, n_out).to(dtype)
            if rank_rows:
                torch.bmm(dm.transpose(1, 2), xm, out=buf)  # [B, out, in]
            else:
                torch.bmm(xm.transpose(1, 2), dm, out=buf)  # [B, in, out]: the transposed gradients
        per_reward = torch.matmul(coef_t, per_sample.reshape(L, B, n_out * n_in))  # [L, K, out*in|in*out]
        if not rank_rows:
            per_reward = per_reward.reshape(L, K, n_in, n_out).transpose(2, 3)  # [L, K, out, in]
        return per_reward.transpose(0, 1).reshape(K, -1)

    def _chunk_columns(self, layers: tuple[int, ...], device: torch.device) -> Tensor:
        """The columns of `[K, P]` that a chunk's gradients fill, cached per chunk."""
        if layers not in self._columns:
            self._columns[layers] = torch.cat(
                [torch.arange(self.offsets[j], self.offsets[j] + self.sizes[j]) for j in layers]
            ).to(device)
        return self._columns[layers]
