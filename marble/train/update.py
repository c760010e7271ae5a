"""One micro-step of the balanced NFT update, and the gradient-cosine diagnostic.

Wiring only: the math lives in `marble.rl` (nft.py, gram.py, balancers.py, diagnostics.py). Per
micro-step (docs/algorithm.md §3-§5): three velocities (trainable adapter with graph; old adapter and
reference without), the per-sample NFT terms, the Gram when the balancer asks for one, the balancer
update, γ -> (ω, ρ), and ONE scalar `combined + λ KL` for the caller to backprop. With the
per_sample Gram source the micro-step runs the policy's backward itself (it yields every reward's
gradient, `marble.rl.per_sample`), returns the balanced policy gradient for the caller to add to
`.grad`, and leaves only `λ KL` to backprop.

Multi-process: the weights `c` arrive already normalised over the GLOBAL micro-batch and multiplied by
the world size, so averaging gradients over ranks gives exactly the global micro-batch's gradient; the
parameter Gram is reduced (mean) over ranks before it is formed, the output Gram summed and rescaled,
so every rank feeds the balancer the same matrix and gets the same α.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from marble.models.lora import AdapterSwitch
from marble.rl.balancers import mgda_gamma
from marble.rl.diagnostics import gram_cosines
from marble.rl.gram import flat_grads, gram_from_output, gram_from_params, gram_of_grads
from marble.rl.nft import NFTTerms, combine_coefficients, combined_loss, kl_loss, nft_terms, per_reward_losses
from marble.rl.per_sample import PerRewardLinearGrads, per_sample_coefficients
from marble.rl.qp import MinNormSolver

Reduce = Callable[[Tensor], Tensor]


@dataclass
class MicroBatch:
    """The B samples of one micro-step (B = train.micro_batch_size on this rank)."""

    x0: Tensor  # [B, C, h, w] clean rollout latents
    emb: Any  # PromptEmbeddings with prompt_embeds [B, L, D], pooled [B, P]
    t: Tensor  # [B] timesteps in (0, 1]
    noise: Tensor  # [B, C, h, w] fresh noise
    r: Tensor  # [B, K'] optimality probability of the balancer's objectives
    c: Tensor  # [B, K'] masked weights (global normalisation x world size)
    r_raw: Tensor  # [B, K] per-reward r (diagnostics)
    c_raw: Tensor  # [B, K] per-reward weights (diagnostics)


@dataclass
class MicroStepResult:
    loss: Tensor  # scalar to backprop: combined policy loss + λ KL
    policy: float
    kl: float | None  # None: the KL was not estimated on this micro-step (nft.kl_every = "step")
    balance: Any | None  # BalanceStats of a refresh on this micro-step, else None
    balance_s: float
    applied: Any | None = None  # BatchGamma: the γ this micro-step applied (and the batch norms)
    cos: Tensor | None = None  # [K'] cos(applied direction, g_k) from the micro-step's Gram, NaN = invalid
    # per_sample Gram source: the policy gradient, already formed, for the caller to add to `.grad`
    # (then `loss` is λ KL alone, or None when λ = 0)
    policy_grads: list[tuple[Tensor, Tensor]] | None = None
    cos_space: str = "output"  # the Gram `cos` comes from: "output" (free), "params" (per_sample, exact)


class StepEnd(NamedTuple):
    """What the end of an optimizer step adds: the refresh committed (if any) and, for a balancer that
    solves on the step (`marble_step`), the step's policy gradient for the caller to add to `.grad`."""

    balance: Any | None  # BalanceStats
    policy_grads: list[tuple[Tensor, Tensor]] | None = None
    cos: Tensor | None = None  # [K'] cos(applied step direction, step gradient g_k), exact (params)
    balance_s: float = 0.0


class NFTUpdate:
    """Computes micro-step losses; holds no optimizer (the trainer steps it)."""

    def __init__(
        self,
        model: Any,
        params: Sequence[Tensor],
        balancer: Any,
        *,
        predict_velocity: Callable[..., Tensor],
        beta: float,
        weight_floor: float,
        kl_weight: float,
        kl_every: str = "micro_step",
        micro_steps_per_step: int = 1,
        world_size: int = 1,
        reduce_mean: Reduce | None = None,
        reduce_sum: Reduce | None = None,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ) -> None:
        self.model = model
        self.params = list(params)
        self.balancer = balancer
        self.predict_velocity = predict_velocity
        self.beta = beta
        self.floor = weight_floor
        self.kl_weight = kl_weight
        self.kl_every = kl_every
        self.micro_steps_per_step = max(1, int(micro_steps_per_step))
        self.world_size = world_size
        self.reduce_mean = reduce_mean
        self.reduce_sum = reduce_sum
        self.autocast = autocast
        self._solver = MinNormSolver()
        self._per_sample: PerRewardLinearGrads | None = None
        self._adapters: AdapterSwitch | None = None  # found on the first forward
        self._step_grads: Tensor | None = (
            None  # [K', P] this rank's per-reward gradients summed over the step
        )

    # ------------------------------------------------------------------------------ forward
    @property
    def adapters(self) -> AdapterSwitch:
        """The policy's adapter switch: "old" for the NFT's old policy, disabled for the KL reference."""
        if self._adapters is None:
            self._adapters = AdapterSwitch(self.model)
        return self._adapters

    def kl_scale(self, step: int, micro_step: int) -> float:
        """Weight of this micro-step's KL estimate: 1 on every micro-step ("micro_step"); with "step", the
        number of micro-steps per optimizer step on the one micro-step `step mod` that number, 0 on the
        others, so the step's KL gradient is unbiased and every micro-step index takes its turn."""
        if self.kl_every == "micro_step":
            return 1.0
        M = self.micro_steps_per_step
        return float(M) if micro_step == step % M else 0.0

    def forward(
        self,
        mb: MicroBatch,
        output_grads: bool,
        with_ref: bool = True,
        capture: Callable[[], AbstractContextManager] = nullcontext,
    ) -> tuple[NFTTerms, Tensor, Tensor | None]:
        """NFT terms of the micro-batch, plus v (with graph) and v_ref for the KL (None: not computed).
        `capture` wraps the forward with a graph alone (the per-sample gradients' layer recording)."""
        t4 = mb.t.reshape(-1, *([1] * (mb.x0.ndim - 1))).to(mb.x0.dtype)  # [B, 1, 1, 1]
        x_t = (1 - t4) * mb.x0 + t4 * mb.noise  # [B, C, h, w] rectified-flow forward process
        with self.autocast():
            with capture():
                v = self.predict_velocity(self.model, x_t, mb.t, mb.emb)  # [B, C, h, w]
            with torch.no_grad():
                with self.adapters.active("old"):
                    v_old = self.predict_velocity(self.model, x_t, mb.t, mb.emb)
                v_ref = None
                if with_ref:
                    with self.adapters.disabled():
                        v_ref = self.predict_velocity(self.model, x_t, mb.t, mb.emb)
        terms = nft_terms(v, v_old, x_t, mb.x0, mb.t, self.beta, self.floor, output_grads=output_grads)
        return terms, v, v_ref

    # ------------------------------------------------------------------------------ gram
    def output_gram(self, terms: NFTTerms, c: Tensor, r: Tensor) -> Tensor:
        """Output-space Gram `[K', K']` of the (global) micro-batch, identical on every rank."""
        H = gram_from_output(terms, c, r, self.beta)  # [K', K'] local samples
        if self.reduce_sum is not None:
            # c carries a factor world_size; H is quadratic in c.
            H = self.reduce_sum(H) / self.world_size**2
        return H

    def gram(
        self, terms: NFTTerms, c: Tensor, r: Tensor, keep_grads: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """The balancer's Gram for this micro-batch, identical on every rank."""
        if self.balancer.gram_source == "output":
            return self.output_gram(terms, c, r), None
        losses = per_reward_losses(terms, c, r, self.beta)  # [K']
        pg = gram_from_params(losses, self.params, all_reduce=self.reduce_mean, keep_grads=keep_grads)
        return pg.gram, pg.grads

    # ------------------------------------------------------------------------------ step
    def micro_step(self, mb: MicroBatch, step: int, micro_step: int) -> MicroStepResult:
        """Forward, optional balancer refresh, and the loss of ONE backward (caller backprops)."""
        bal = self.balancer
        if bal.gram_source == "per_sample":
            return self.per_sample_micro_step(mb, step, micro_step)
        refresh = bal.needs_gram(step, micro_step) and bal.gram_source is not None
        output = bal.needs_batch_gram or (refresh and bal.gram_source == "output")
        kl_scale = self.kl_scale(step, micro_step)
        terms, v, v_ref = self.forward(mb, output_grads=output, with_ref=kl_scale > 0)
        stats, H = None, None
        t0 = time.perf_counter()
        if refresh:
            G, _ = self.gram(terms, mb.c, mb.r)
            stats = bal.observe(G, step=step, micro_step=micro_step)
            H = G if bal.gram_source == "output" else None
        if bal.needs_batch_gram and H is None:
            H = self.output_gram(terms, mb.c, mb.r)
        applied = bal.batch_gamma(H)  # γ for THIS batch
        cos = None if H is None else gram_cosines(H, applied.gamma).per_reward  # free alignment, every step
        balance_s = time.perf_counter() - t0
        omega, rho = combine_coefficients(applied.gamma.to(mb.c.device), mb.c, mb.r)  # [B], [B]
        policy = combined_loss(terms, omega, rho, self.beta)
        loss, kl = policy, None
        if v_ref is not None:
            kl_t = kl_loss(v, v_ref)
            loss, kl = policy + self.kl_weight * kl_scale * kl_t, float(kl_t.detach())
        return MicroStepResult(loss, float(policy.detach()), kl, stats, balance_s, applied, cos)

    def per_sample_micro_step(self, mb: MicroBatch, step: int, micro_step: int) -> MicroStepResult:
        """The update's own backward gives every reward's gradient (`marble.rl.per_sample`): ONE backward
        of `Σ_i N_i`, scaled per reward at the trained layers; the balancer sees their exact Gram and its
        γ combines them into the policy gradient, returned for the caller to add to `.grad`. The
        caller backprops λ KL alone (a second backward, skipped when λ = 0: the KL's per-sample output
        gradients are not multiples of the policy's; with `nft.kl_every = "step"` on one micro-step per
        optimizer step). A balancer that solves on the step (`marble_step`) gets no Gram here: the
        per-reward gradients are summed, and `end_step` solves and forms the policy gradient."""
        bal = self.balancer
        grads = self._per_sample_grads()
        kl_scale = self.kl_scale(step, micro_step)
        kl_backward = self.kl_weight > 0 and kl_scale > 0
        terms, v, v_ref = self.forward(mb, output_grads=True, with_ref=kl_scale > 0, capture=grads.capture)
        coefficients = per_sample_coefficients(terms, mb.c, mb.r, self.beta)
        # a balancer that solves on the step sums the step's gradients in place (micro-step 0 starts
        # the sum; at SD3.5 Medium scale [K', P] is hundreds of MB), solved and applied by end_step
        into = None if micro_step == 0 or not bal.solves_step else self._step_grads
        per_reward = grads.per_reward_grads(terms.N.sum(), coefficients, retain_graph=kl_backward, out=into)
        # balance_s: the per-reward products and everything after them, not the backward itself, which
        # the policy gradient needs with any balancer
        t0 = time.perf_counter() - grads.seconds
        if bal.solves_step:
            self._step_grads = per_reward  # [K', P]
        else:
            pg = gram_of_grads(per_reward, all_reduce=self.reduce_mean, keep_grads=True)

        def kl_term() -> tuple[Tensor | None, float | None]:  # (λ-weighted loss to backprop, KL logged)
            if v_ref is None:
                return None, None
            kl_t = kl_loss(v, v_ref)
            return (self.kl_weight * kl_scale * kl_t if kl_backward else None), float(kl_t.detach())

        if bal.solves_step:
            balance_s = time.perf_counter() - t0
            with torch.no_grad():  # logged under the γ of the last solve: this step's comes at its end
                omega, rho = combine_coefficients(bal.gamma.to(mb.c.device), mb.c, mb.r)
                policy = float(combined_loss(terms, omega, rho, self.beta))
            loss, kl = kl_term()
            return MicroStepResult(loss, policy, kl, None, balance_s, cos_space="params")
        stats = (
            bal.observe(pg.gram, step=step, micro_step=micro_step)
            if bal.needs_gram(step, micro_step)
            else None
        )
        applied = bal.batch_gamma(pg.gram)
        cos = gram_cosines(pg.gram, applied.gamma).per_reward
        pairs = self._weight_grads(applied.gamma.to(pg.grads.device, pg.grads.dtype) @ pg.grads)
        balance_s = time.perf_counter() - t0
        with torch.no_grad():
            omega, rho = combine_coefficients(applied.gamma.to(mb.c.device), mb.c, mb.r)
            policy = float(combined_loss(terms, omega, rho, self.beta))
        loss, kl = kl_term()
        return MicroStepResult(loss, policy, kl, stats, balance_s, applied, cos, pairs, cos_space="params")

    def _per_sample_grads(self) -> PerRewardLinearGrads:
        if self._per_sample is None:
            self._per_sample = PerRewardLinearGrads.of_trained(self.model)
        return self._per_sample

    def _weight_grads(self, policy_grad: Tensor) -> list[tuple[Tensor, Tensor]]:
        """`[P]` flat policy gradient (the per-sample layout) -> (trained weight, its gradient) pairs."""
        weights = [m.weight for m in self._per_sample_grads().modules]
        split = torch.split(policy_grad, [w.numel() for w in weights])
        return [(w, g.view_as(w).to(w.dtype)) for w, g in zip(weights, split, strict=True)]

    def end_step(self, step: int) -> StepEnd:
        """After the step's last micro-step: the balancer commits a step-accumulated refresh (if any); a
        balancer that solves on the step (`marble_step`) solves on the Gram of the per-reward gradients
        summed over the step (averaged over ranks, as for a micro-step) and its γ weights their sum."""
        bal = self.balancer
        if not bal.solves_step:
            return StepEnd(bal.end_step(step))
        if self._step_grads is None:
            raise RuntimeError(f"balancer {bal.kind!r}: end_step without a per_sample micro-step in the step")
        t0 = time.perf_counter()
        pg = gram_of_grads(self._step_grads, all_reduce=self.reduce_mean, keep_grads=True)
        self._step_grads = None
        stats = bal.solve_step(pg.gram, step)
        pairs = self._weight_grads(bal.gamma.to(pg.grads.device, pg.grads.dtype) @ pg.grads)
        cos = gram_cosines(pg.gram, bal.gamma).per_reward
        return StepEnd(stats, pairs, cos, time.perf_counter() - t0)

    # ------------------------------------------------------------------------------ diagnostics
    def diagnose(
        self, mb: MicroBatch, direction_cosines: Callable[[Tensor, Tensor], Any]
    ) -> dict[str, float]:
        """Cosines of the per-reward gradients g_k (masked, KL excluded) with three directions:
        the applied one (the γ the balancer gives this batch before this step's refresh, through (ω, ρ)), the fresh MGDA one, the equal-weight sum
        (docs/algorithm.md §6). Costs K + 1 extra backward passes; touches no `.grad` and no state."""
        # The batch norms the balancer applies come from the Gram its source gives in training: the
        # output-space one, or (per_sample) the parameter-space one, which the K backwards below give.
        per_sample = self.balancer.gram_source == "per_sample"
        batch = self.balancer.needs_batch_gram and not per_sample
        terms, _, _ = self.forward(mb, output_grads=batch, with_ref=False)
        losses = per_reward_losses(terms, mb.c_raw, mb.r_raw, self.beta)  # [K]
        pg = gram_from_params(losses, self.params, all_reduce=self.reduce_mean, keep_grads=True)
        grads = pg.grads  # [K, P]
        H = self.output_gram(terms, mb.c, mb.r) if batch else None
        if per_sample and self.balancer.needs_batch_gram:
            same = (
                mb.c.shape == mb.c_raw.shape and torch.equal(mb.c, mb.c_raw) and torch.equal(mb.r, mb.r_raw)
            )
            H = pg.gram if same else self.gram(terms, mb.c, mb.r)[0]  # the balancer's objectives' Gram
        gamma = self.balancer.batch_gamma(H).gamma.to(mb.c.device)
        omega, rho = combine_coefficients(gamma, mb.c, mb.r)
        applied = flat_grads(combined_loss(terms, omega, rho, self.beta), self.params, retain_graph=False)
        applied = torch.where(torch.isfinite(applied), applied, torch.zeros_like(applied))
        if self.reduce_mean is not None:
            applied = self.reduce_mean(applied)
        fresh_gamma = mgda_gamma(pg.gram, self._solver)  # [K] α*_k mean|g| / |g_k|
        fresh = fresh_gamma.to(grads.dtype).to(grads.device) @ grads  # [P]
        equal = grads.mean(0)  # [P]
        out: dict[str, float] = {}
        for name, d in (("applied", applied), ("fresh", fresh), ("equal_sum", equal)):
            cs = direction_cosines(d, grads)
            out[f"diag/cos_{name}/min"] = float(cs.min)
            out[f"diag/cos_{name}/mean"] = float(cs.mean)
            out[f"diag/cos_{name}/var"] = float(cs.var)
        return out
