"""Balancers: how K per-reward gradients become one update (docs/algorithm.md §4). A registry keyed by
the config's `kind`; the trainer uses this one interface and never branches on the name.

Trainer usage (b = index of the micro-batch rows; T = timesteps trained per sample)::

    balancer = build_balancer(cfg.balancer, cfg.trained_reward_names, micro_steps_per_batch=T)
    adv = balancer.objective_advantages(R_raw, group_ids, std_mode)   # [N, K'] (weighted_sum, gdpo: K' = 1)
    r, mask = optimality_probability(adv, C)                # [N, K'] each
    for micro_step in range(accumulation * T):              # one optimizer step
        terms = nft_terms(v, v_old, x_t, x0, t, beta, floor)
        c = reward_weights(mask[b], C)                      # [B, K']
        H = gram_from_output(terms, c, r[b], beta)          # free; needed if balancer.needs_batch_gram
        if balancer.needs_gram(step, micro_step):           # never for weighted_sum / equal / gdpo
            G = gram_from_params(per_reward_losses(terms, c, r[b], beta), params).gram  # or H ("output")
            stats = balancer.observe(G, step, micro_step)   # a refresh (or its accumulation)
        gamma = balancer.batch_gamma(H).gamma               # γ for THIS batch, pure
        omega, rho = combine_coefficients(gamma, c, r[b])
        loss = combined_loss(terms, omega, rho, beta) + kl_weight * kl_loss(v, v_ref)   # ONE backward
    balancer.end_step(step)                                 # commits a step-accumulated refresh

Interface notes:
- `update(G, step)` is one whole refresh from one Gram (`observe` + `end_step`).
- `current_stats()` returns α without solving; `BalanceStats.to_metrics(names)` gives the §6 names.
- `gram.gram_from_params` returns a `ParamGram` NamedTuple (`.gram`, `.norms`, `.grads`, `.nonfinite`);
  its `all_reduce` hook is applied to the stacked gradients `[K, P]` (exact for DDP), not to the Gram.
- `state_dict()` is plain JSON-serialisable Python (floats round-trip exactly); `load_state_dict`
  refuses a state of another kind or reward list with a `CheckpointError` naming the field.
- Refresh schedule of the Gram presets: the first refresh step observes every micro-step; then
  optimizer steps n, 2n, ... (n = `refresh_every`) observe the micro-steps `refresh_micro_steps`
  selects (the first; the first timestep slot of every micro-batch; all).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from marble.errors import CheckpointError
from marble.rl.advantages import gdpo_advantages, group_advantages
from marble.rl.gram import NormalizedGram, as_gram, gram_norms, normalize_gram
from marble.rl.qp import MinNormSolver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BalanceStats:
    """What one balancer step did (every tensor `[K']` float64)."""

    alpha: Tensor  # applied weights on the simplex (EMA α; γ/Σγ for PCGrad/CAGrad)
    gamma: Tensor  # coefficients applied through (ω, ρ)
    refreshed: bool  # a Gram was consumed at this call
    alpha_fresh: Tensor | None = None  # the latest solution before the EMA (normalised to Σ = 1)
    grad_norms: Tensor | None = None  # |g_k| of the latest refresh's Gram (NaN if not finite)
    min_norm: float | None = None  # MGDA: |Σ α* ĝ|; PCGrad/CAGrad: |Σ γ g|
    qp_fallbacks: int = 0  # cumulative count of fallbacks
    fallback_reason: str | None = None  # reason of this refresh's fallback, if any
    qp_ms: float = 0.0  # solve time of this refresh
    num_refreshes: int = 0  # cumulative refreshes (solves)

    def to_metrics(self, names: list[str]) -> dict[str, float]:
        """Flat metrics with the names of docs/algorithm.md §6."""
        out: dict[str, float] = {
            f"balance/alpha/{n}": float(a) for n, a in zip(names, self.alpha, strict=True)
        }
        out["balance/qp_fallbacks"] = float(self.qp_fallbacks)
        if self.alpha_fresh is not None:
            out.update(
                {f"balance/alpha_fresh/{n}": float(a) for n, a in zip(names, self.alpha_fresh, strict=True)}
            )
        if self.grad_norms is not None:
            out.update(
                {f"balance/grad_norm/{n}": float(g) for n, g in zip(names, self.grad_norms, strict=True)}
            )
        if self.refreshed:
            if self.min_norm is not None:
                out["balance/min_norm"] = float(self.min_norm)
            out["balance/qp_ms"] = float(self.qp_ms)
        return out


class BatchGamma(NamedTuple):
    """The coefficients applied to one batch through (ω, ρ), with what they came from."""

    gamma: Tensor  # [K'] float64
    norms: Tensor | None = None  # [K'] per-reward gradient norms of this batch (normalize="batch")
    capped: Tensor | None = None  # [K'] bool: γ_k was bounded by gamma_cap on this batch


def _t(x: np.ndarray | list[float]) -> Tensor:
    return torch.tensor(np.asarray(x, dtype=np.float64), dtype=torch.float64)


def _on_simplex(c: np.ndarray) -> np.ndarray:
    """Weights for logging: c / Σc (already so for MGDA; PCGrad/CAGrad γ are non-negative)."""
    s = c.sum()
    return c / s if s > 0 else np.full(c.shape, 1.0 / c.size)


def _floats(x: np.ndarray | None) -> list[float] | None:
    return None if x is None else [float(v) for v in x]


def _array(x: list[float] | None) -> np.ndarray | None:
    return None if x is None else np.asarray(x, dtype=np.float64)


BALANCERS: dict[str, type[Balancer]] = {}


def register_balancer(*kinds: str):
    """Class decorator: make a balancer class buildable from configs of these `kind`s."""

    def wrap(cls: type[Balancer]) -> type[Balancer]:
        for kind in kinds:
            if kind in BALANCERS:
                raise ValueError(f"balancer kind {kind!r} registered twice")
            BALANCERS[kind] = cls
        return cls

    return wrap


def build_balancer(cfg: Any, reward_names: list[str], micro_steps_per_batch: int = 1) -> Balancer:
    """Build the balancer selected by `cfg.kind` (a `marble.config` balancer node). The trainer's
    micro-steps are micro-batch-major: `micro_steps_per_batch` (= timesteps trained per sample) tells
    a Gram balancer where each micro-batch starts (`refresh_micro_steps="first_slot"`)."""
    try:
        cls = BALANCERS[cfg.kind]
    except KeyError:
        raise ValueError(f"balancer.kind={cfg.kind!r} is not one of {sorted(BALANCERS)}") from None
    if not reward_names:
        raise ValueError("build_balancer: at least one trained reward is needed")
    if issubclass(cls, GramBalancer):
        return cls(cfg, list(reward_names), micro_steps_per_batch)
    return cls(cfg, list(reward_names))


class Balancer:
    """Base: identity rewards, fixed coefficients, no Gram."""

    gram_source: str | None = None

    def __init__(self, cfg: Any, reward_names: list[str]):
        self.cfg = cfg
        self.kind: str = cfg.kind
        self.reward_names = list(reward_names)
        self._gamma = np.ones(len(self.objective_names))

    # -------------------------------------------------------------------- what the trainer uses
    @property
    def objective_names(self) -> list[str]:
        """Names of the K' objectives the advantages and losses are computed for."""
        return self.reward_names

    def prepare_rewards(self, rewards: Tensor) -> Tensor:
        """Raw rewards `[N, K]` -> the objectives' rewards `[N, K']` (identity here)."""
        if rewards.ndim != 2 or rewards.shape[1] != len(self.reward_names):
            raise ValueError(
                f"rewards must be [N, {len(self.reward_names)}] ({self.reward_names}), got {tuple(rewards.shape)}"
            )
        return rewards

    def objective_advantages(self, rewards: Tensor, group_ids: Tensor, std_mode: str) -> Tensor:
        """Raw rewards `[N, K]` -> the objectives' advantages `[N, K']` (NaN = not applicable): the
        per-objective group advantages of `prepare_rewards` (docs/algorithm.md §2)."""
        return group_advantages(self.prepare_rewards(rewards), group_ids, std_mode).adv

    def needs_gram(self, step: int, micro_step: int) -> bool:
        """Whether `observe` wants a Gram at this (optimizer step, micro-step)."""
        return False

    needs_batch_gram = False
    """Whether `batch_gamma` needs the output-space Gram of every batch it is applied to."""

    solves_step = False
    """Whether the trainer sums every reward's gradient over the optimizer step and calls `solve_step`
    with their Gram at its end, applying the γ it gives to the summed gradients (`marble_step`)."""

    def solve_step(self, gram: Tensor, step: int) -> BalanceStats:
        raise RuntimeError(f"balancer {self.kind!r} does not solve on the optimizer step")

    def observe(self, gram: Tensor, step: int, micro_step: int = 0) -> BalanceStats:
        raise RuntimeError(f"balancer {self.kind!r} uses no Gram; needs_gram() is always False")

    def update(self, gram: Tensor, step: int | None = None) -> BalanceStats:
        raise RuntimeError(f"balancer {self.kind!r} uses no Gram; needs_gram() is always False")

    def end_step(self, step: int) -> BalanceStats | None:
        """Called after the last micro-step of every optimizer step; a refresh it commits, if any."""
        return None

    def batch_gamma(self, batch_gram: Tensor | None = None) -> BatchGamma:
        """Coefficients `[K']` (float64) to apply through (ω, ρ) to one batch (pure: no state change)."""
        return BatchGamma(gamma=_t(self._gamma))

    @property
    def gamma(self) -> Tensor:
        """The coefficients without a batch (raises for `normalize="batch"`, which needs one)."""
        return self.batch_gamma().gamma

    def current_stats(self) -> BalanceStats:
        g = self._gamma
        return BalanceStats(alpha=_t(g / g.sum()), gamma=_t(g), refreshed=False)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "reward_names": list(self.reward_names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("kind", self.kind), ("reward_names", self.reward_names)):
            if state.get(key) != mine:
                raise CheckpointError(
                    f"balancer state: {key}={state.get(key)!r} in the checkpoint but {mine!r} in the config"
                )


@register_balancer("weighted_sum")
class WeightedSumBalancer(Balancer):
    """One objective: the NaN-aware weighted MEAN of the raw rewards, one advantage (the baseline)."""

    def __init__(self, cfg: Any, reward_names: list[str]):
        super().__init__(cfg, reward_names)
        weights = cfg.weights if cfg.weights is not None else [1.0] * len(reward_names)
        if len(weights) != len(reward_names):
            raise ValueError(f"balancer.weights has {len(weights)} entries for rewards {reward_names}")
        self.weights = torch.tensor(weights, dtype=torch.float64)  # [K]

    @property
    def objective_names(self) -> list[str]:
        return ["weighted_sum"]

    def prepare_rewards(self, rewards: Tensor) -> Tensor:
        """`[N, K] -> [N, 1]`: Σ_k w_k R_k / Σ_k w_k over the rewards that apply (and have w_k > 0);
        NaN when none applies."""
        super().prepare_rewards(rewards)
        R = rewards.to(torch.float64)  # [N, K]
        w = self.weights.to(R.device).expand_as(R)  # [N, K]
        use = torch.isfinite(R) & (w > 0)  # [N, K]; zero weights never touch NaN/inf (0 * inf = NaN)
        num = torch.where(use, w * R, torch.zeros_like(R)).sum(1)  # [N]
        den = torch.where(use, w, torch.zeros_like(R)).sum(1)  # [N]
        out = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))
        return out[:, None]  # [N, 1]


@register_balancer("gdpo")
class GDPOBalancer(WeightedSumBalancer):
    """GDPO (arXiv 2601.05242, §3): one advantage per sample, the batch-whitened weighted sum of the
    per-reward group-normalised advantages (`advantages.gdpo_advantages`); `nft.std_mode` does not
    apply (GDPO fixes its normalisations). A weighted sum that normalises each reward before summing:
    the same weights, one objective, γ = [1]."""

    @property
    def objective_names(self) -> list[str]:
        return ["gdpo"]

    def prepare_rewards(self, rewards: Tensor) -> Tensor:
        raise TypeError("gdpo has no objective reward: its advantage comes from objective_advantages()")

    def objective_advantages(self, rewards: Tensor, group_ids: Tensor, std_mode: str) -> Tensor:
        Balancer.prepare_rewards(self, rewards)  # shape check
        return gdpo_advantages(rewards, group_ids, self.weights)  # [N, 1]


@register_balancer("equal")
class EqualBalancer(Balancer):
    """α = 1/K fixed on per-reward advantages: isolates per-reward z-scoring and masking."""

    def __init__(self, cfg: Any, reward_names: list[str]):
        super().__init__(cfg, reward_names)
        self._gamma = np.full(len(reward_names), 1.0 / len(reward_names))


def ema_on_valid(
    prev: np.ndarray | None, fresh: np.ndarray, valid: np.ndarray, decay: float | None
) -> np.ndarray:
    """EMA of simplex weights over the rewards valid in this refresh (§4.4, ours for invalid rewards).

    `α_V ← ρ α_V + (1 - ρ) m_V α*_V` with `m_V = Σ_{k∈V} α_k`: the valid rewards share the mass they
    had, a reward with no valid sample in the refresh keeps its smoothed α (a refresh that did not see
    a specialist says nothing about it). No EMA (`decay` None) or no earlier α: start from uniform 1/K
    with ρ = 0, so the first refresh gives `α*` scaled to the valid rewards' uniform share; no EMA
    (`decay` None): `α*` as it is.
    """
    if decay is None:
        return fresh.copy()
    if prev is None:
        prev, decay = np.full(fresh.shape, 1.0 / fresh.size), 0.0
    out = prev.copy()
    mass = float(prev[valid].sum())
    out[valid] = decay * prev[valid] + (1.0 - decay) * mass * fresh[valid]
    return out


class GramBalancer(Balancer):
    """Shared machinery of the Gram-based presets: refresh schedule, accumulation, EMA, fallbacks.

    Per micro-step the trainer asks `needs_gram` and, if so, passes the Gram to `observe`; then it asks
    `batch_gamma(batch_gram)` for the γ of the batch it applies; after the step's last micro-step it
    calls `end_step`. `refresh` (docs/algorithm.md §4.6):
    - "micro_batch" (the paper): every observed micro-step is a refresh of its own (solve, EMA).
    - "step": the observed micro-steps of a refresh step are summed into one Gram; each observation
      re-solves on the sum so far (the rest of the step uses that α, EMA'd with the committed one),
      and `end_step` commits the EMA of the whole step's solution.
    Subclasses implement `_fresh(ng, G) -> (coefficients, reason, qp_ms, min_norm)`, `_blend` and
    `_coefficients_to_gamma(coeffs, ng)`.
    """

    def __init__(self, cfg: Any, reward_names: list[str], micro_steps_per_batch: int = 1):
        super().__init__(cfg, reward_names)
        self.gram_source = cfg.gram_source
        self.refresh_every: int = cfg.refresh_every
        self.ema_decay: float | None = cfg.ema_decay
        self.refresh: str = cfg.refresh
        self.refresh_micro_steps: str = cfg.refresh_micro_steps
        self.micro_steps_per_batch = max(1, int(micro_steps_per_batch))
        K = len(reward_names)
        self._coeffs: np.ndarray | None = None  # committed EMA'd α (MGDA) or γ (PCGrad/CAGrad)
        self._pending: np.ndarray | None = None  # "step": coefficients of the refresh in progress
        self._acc: np.ndarray | None = None  # "step": Gram summed over the refresh step so far
        self._acc_count = 0
        self._last_good: np.ndarray | None = None  # last non-fallback fresh solution
        self._fresh_last: np.ndarray | None = None  # α* of the latest solve (logging)
        self._norms: np.ndarray | None = None  # |g_k| of the latest solve
        self._gamma = np.full(K, 1.0 / K)  # coefficients from the cached norms (before any refresh: 1/K)
        self._num_refreshes = 0
        self._fallbacks = 0
        self._first_refresh_step: int | None = None
        self._last_refresh_step: int | None = None

    # ------------------------------------------------------------------------------ schedule
    def needs_gram(self, step: int, micro_step: int) -> bool:
        """Refresh steps: the first one observed (every micro-step, §4.6) and every `refresh_every`-th."""
        if self._first_refresh_step is None or step == self._first_refresh_step:
            return True
        if step % self.refresh_every:
            return False
        which = self.refresh_micro_steps
        if which == "all":
            return True
        if which == "first_slot":  # the first timestep slot of every micro-batch: each sample once
            return micro_step % self.micro_steps_per_batch == 0
        return micro_step == 0

    def _fresh(self, ng: NormalizedGram, G: np.ndarray) -> tuple[np.ndarray, str | None, float, float]:
        raise NotImplementedError

    def _blend(self, prev: np.ndarray | None, fresh: np.ndarray, valid: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _coefficients_to_gamma(self, coeffs: np.ndarray, ng: NormalizedGram) -> np.ndarray:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ refreshes
    def observe(self, gram: Tensor, step: int, micro_step: int = 0) -> BalanceStats:
        """Consume the Gram `[K', K']` of one observed micro-step (see the class docstring)."""
        G = self._checked_refresh(gram, step)
        if self.refresh == "micro_batch":
            return self._solve(G, step, commit=True)
        self._acc = G if self._acc is None else self._acc + G
        self._acc_count += 1
        return self._solve(self._acc, step, commit=False)

    def _checked_refresh(self, gram: Tensor, step: int) -> np.ndarray:
        """The Gram as `[K', K']` float64 (refused otherwise), recording `step` as a refresh step."""
        G = as_gram(gram)  # [K, K]
        if G.shape != (len(self.objective_names),) * 2:
            raise ValueError(f"Gram must be [{len(self.objective_names)}]*2, got {G.shape}")
        if self._first_refresh_step is None:
            self._first_refresh_step = step
        self._last_refresh_step = step
        return G

    def end_step(self, step: int) -> BalanceStats | None:
        """End of an optimizer step: commit the step's accumulated refresh ("step"), else nothing."""
        if self._acc is None:
            return None
        stats = self._solve(self._acc, step, commit=True)
        self._acc, self._acc_count, self._pending = None, 0, None
        return stats

    def update(self, gram: Tensor, step: int | None = None) -> BalanceStats:
        """One whole refresh from one Gram (`observe` then `end_step`)."""
        stats = self.observe(gram, step if step is not None else 0)
        committed = self.end_step(step if step is not None else 0)
        return committed if committed is not None else stats

    def _solve(self, G: np.ndarray, step: int, commit: bool) -> BalanceStats:
        ng = normalize_gram(G)
        if not ng.valid.any():
            # Nothing to learn from (every gradient zero or not finite): keep the cached α and γ.
            if commit:
                self._num_refreshes += 1
                self._fallbacks += 1
                log.warning(
                    "balancer %s: no valid reward gradient at step %s; keeping weights", self.kind, step
                )
            return self._stats(None, ng.norms, None, "no_valid_reward", 0.0)
        fresh, reason, qp_ms, min_norm = self._fresh(ng, G)
        blended = self._blend(self._coeffs, fresh, ng.valid)
        self._fresh_last, self._norms = fresh, ng.norms
        if commit:
            self._num_refreshes += 1
            if reason is None:
                self._last_good = fresh
            else:
                self._fallbacks += 1
            self._coeffs = blended
        else:
            self._pending = blended
        self._gamma = self._coefficients_to_gamma(blended, ng)
        return self._stats(fresh, ng.norms, min_norm, reason, qp_ms)

    # ------------------------------------------------------------------------------ applied γ
    def _alpha(self) -> np.ndarray:
        coeffs = self._pending if self._pending is not None else self._coeffs
        return _on_simplex(coeffs if coeffs is not None else self._gamma)

    def _stats(self, fresh, norms, min_norm, reason, qp_ms) -> BalanceStats:
        return BalanceStats(
            alpha=_t(self._alpha()),
            gamma=_t(self._gamma),
            refreshed=True,
            alpha_fresh=None if fresh is None else _t(_on_simplex(fresh)),
            grad_norms=_t(norms),
            min_norm=min_norm,
            qp_fallbacks=self._fallbacks,
            fallback_reason=reason,
            qp_ms=qp_ms,
            num_refreshes=self._num_refreshes,
        )

    def current_stats(self) -> BalanceStats:
        """α now (with a refresh in progress: its pending α), the latest α* and its Gram's norms."""
        return BalanceStats(
            alpha=_t(self._alpha()),
            gamma=_t(self._gamma),
            refreshed=False,
            alpha_fresh=None if self._fresh_last is None else _t(_on_simplex(self._fresh_last)),
            grad_norms=None if self._norms is None else _t(self._norms),
            qp_fallbacks=self._fallbacks,
            num_refreshes=self._num_refreshes,
        )

    @property
    def num_refreshes(self) -> int:
        return self._num_refreshes

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "coeffs": _floats(self._coeffs),
            "pending": _floats(self._pending),
            "acc": None if self._acc is None else [_floats(row) for row in self._acc],
            "acc_count": self._acc_count,
            "last_good": _floats(self._last_good),
            "fresh_last": _floats(self._fresh_last),
            "norms": _floats(self._norms),
            "gamma": _floats(self._gamma),
            "num_refreshes": self._num_refreshes,
            "fallbacks": self._fallbacks,
            "first_refresh_step": self._first_refresh_step,
            "last_refresh_step": self._last_refresh_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._coeffs = _array(state["coeffs"])
        self._pending = _array(state["pending"])
        self._acc = None if state["acc"] is None else np.asarray(state["acc"], dtype=np.float64)
        self._acc_count = int(state["acc_count"])
        self._last_good = _array(state["last_good"])
        self._fresh_last = _array(state["fresh_last"])
        self._norms = _array(state["norms"])
        self._gamma = _array(state["gamma"])
        self._num_refreshes = int(state["num_refreshes"])
        self._fallbacks = int(state["fallbacks"])
        self._first_refresh_step = state["first_refresh_step"]
        self._last_refresh_step = state["last_refresh_step"]


def rescale_to_gamma(
    alpha: np.ndarray, norms: np.ndarray, valid: np.ndarray, cap: float | None = None
) -> np.ndarray:
    """Normalize-and-rescale (§4.5): `γ_k = α_k · s / |g_k|` with `s = mean_valid |g_j|`, 0 for invalid
    rewards, so the update `Σ γ_k g_k = (Σ α_k ĝ_k) · s` keeps the scale of the raw gradients.

    `cap` (ours) bounds the boost of a weak gradient: `γ_k = α_k · s / max(|g_k|, s / cap)`, so
    `γ_k <= cap · α_k` and a reward whose gradient is tiny on this batch adds less than its α share
    instead of its normalised noise at full weight."""
    if not valid.any():
        return np.zeros_like(alpha)
    scale = float(norms[valid].mean())
    safe = np.where(valid, norms, 1.0)
    if cap is not None:
        safe = np.maximum(safe, scale / cap)
    return np.where(valid, alpha * scale / safe, 0.0)


@register_balancer("marble", "marble_paper", "marble_full", "marble_ub")
class MGDABalancer(GramBalancer):
    """MARBLE: normalised MGDA min-norm weights, EMA, normalize-and-rescale (§4). The presets differ
    only in their config (Gram source, refresh schedule, EMA, where the per-reward norms of γ come
    from: `normalize="refresh"` caches them with α, `"batch"` takes them from the batch being applied)."""

    def __init__(self, cfg: Any, reward_names: list[str], micro_steps_per_batch: int = 1):
        super().__init__(cfg, reward_names, micro_steps_per_batch)
        self.solver = MinNormSolver(eps=cfg.qp_eps, max_iter=cfg.qp_max_iter)
        self.normalize: str = cfg.normalize
        self.gamma_cap: float | None = cfg.gamma_cap

    def _fresh(self, ng, G):
        # the previous α* hints the support: refreshes within a step solve a running sum that changes
        # little, and the hint comes from the balancer's state, so a resumed run takes the same path
        res = self.solver.solve(
            ng.gram_hat, ng.valid, fallback=self._last_good, support_hint=self._fresh_last
        )
        return res.alpha, res.fallback_reason, res.solve_ms, res.min_norm

    def _blend(self, prev, fresh, valid):
        return ema_on_valid(prev, fresh, valid, self.ema_decay)

    def _coefficients_to_gamma(self, coeffs, ng):
        return rescale_to_gamma(coeffs, ng.norms, ng.valid)

    @property
    def needs_batch_gram(self) -> bool:
        return self.normalize == "batch"

    def batch_gamma(self, batch_gram: Tensor | None = None) -> BatchGamma:
        """γ for one batch: the current α with the batch's own norms (`normalize="batch"`), read from
        the diagonal of its output-space Gram `[K', K']` (free), bounded by `gamma_cap`."""
        if self.normalize == "refresh":
            return super().batch_gamma(batch_gram)
        if batch_gram is None:
            raise ValueError(f"balancer {self.kind!r} (normalize=batch) needs the batch's output-space Gram")
        norms, valid = gram_norms(batch_gram)
        gamma = rescale_to_gamma(self._alpha(), norms, valid, self.gamma_cap)
        capped = np.zeros(len(gamma), dtype=bool)
        if self.gamma_cap is not None and valid.any():
            capped = valid & (norms < norms[valid].mean() / self.gamma_cap)
        return BatchGamma(gamma=_t(gamma), norms=_t(norms), capped=torch.as_tensor(capped))


@register_balancer("marble_step")
class StepMGDABalancer(MGDABalancer):
    """`marble_step`: the fresh normalised-MGDA α of the optimizer step's summed per-reward gradients
    (their Gram, `solve_step`), γ from their norms, no EMA: no micro-step asks for a Gram, and until the
    first solve γ is 1/K."""

    solves_step = True

    def needs_gram(self, step: int, micro_step: int) -> bool:
        return False

    def solve_step(self, gram: Tensor, step: int) -> BalanceStats:
        """One refresh on the step's Gram `[K', K']`, committed: `gamma` then weights that step."""
        return self._solve(self._checked_refresh(gram, step), step, commit=True)


def mgda_gamma(gram: Tensor | np.ndarray, solver: MinNormSolver | None = None) -> Tensor:
    """Fresh normalised-MGDA coefficients of one Gram (no EMA): the 'fresh direction' of the
    diagnostics (§6). Returns `[K]` float64."""
    ng = normalize_gram(gram)
    res = (solver or MinNormSolver()).solve(ng.gram_hat, ng.valid)
    return _t(rescale_to_gamma(res.alpha, ng.norms, ng.valid))


def pcgrad_coefficients(G: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PCGrad (Yu et al. 2020) in Gram form (§4): projected gradient i is `Σ_j U[i, j] g_j`.

    Starting from u_i = e_i, for j in a random order (one permutation per i; j = i included, as in the
    original vector algorithm) if `u_iᵀ G e_j < 0` then `u_i -= (u_iᵀ G e_j / G_jj) e_j`. Returns
    γ = Σ_i u_i `[K]`. Zero-norm gradients (G_jj <= 0) are never projected on.
    """
    K = G.shape[0]
    U = np.eye(K)
    for i in range(K):
        for j in rng.permutation(K):
            if not G[j, j] > 0:
                continue
            dot = U[i] @ G[:, j]
            if dot < 0:
                U[i, j] -= dot / G[j, j]
    return U.sum(0)


def euclidean_simplex_projection(x: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (sort-based, Duchi et al. 2008)."""
    u = np.sort(x)[::-1]
    css = np.cumsum(u) - 1.0
    ks = np.arange(1, x.size + 1)
    k = ks[u - css / ks > 0][-1]
    return np.clip(x - css[k - 1] / k, 0.0, None)


def cagrad_coefficients(G: np.ndarray, c: float, iters: int = 2000) -> np.ndarray:
    """CAGrad (Liu et al. 2021) in Gram form (§4), returns γ `[K]`.

    `w = argmin_{w∈Δ} wᵀ G 1/K + c |g0| sqrt(wᵀ G w)` with `|g0|² = 1ᵀG1/K²` (convex; projected
    gradient with backtracking), `λ = c |g0| / sqrt(wᵀ G w)`, `γ = (1/K + λ w) / (1 + c²)`.
    """
    K = G.shape[0]
    b = G.sum(1) / K  # [K] = G 1/K
    g0 = math.sqrt(max(b.sum() / K, 0.0))
    cg = c * g0

    def f(w: np.ndarray) -> float:
        return float(w @ b + cg * math.sqrt(max(w @ G @ w, 0.0)))

    w = np.full(K, 1.0 / K)
    step = 1.0 / max(float(np.abs(G).max()), 1e-300)
    fw = f(w)
    for _ in range(iters):
        gw = math.sqrt(max(w @ G @ w, 1e-300))
        grad = b + cg * (G @ w) / gw
        while True:
            w_new = euclidean_simplex_projection(w - step * grad)
            f_new = f(w_new)
            if f_new <= fw - 1e-4 * (grad @ (w - w_new)) or step < 1e-20:
                break
            step *= 0.5
        if abs(fw - f_new) <= 1e-15 * max(1.0, abs(fw)):
            w, fw = w_new, f_new
            break
        w, fw, step = w_new, f_new, step * 2.0
    gw = math.sqrt(max(w @ G @ w, 0.0))
    lam = cg / gw if gw > 1e-12 * max(g0, 1e-300) else 0.0
    return (1.0 / K + lam * w) / (1.0 + c * c)


class _SurgeryBalancer(GramBalancer):
    """PCGrad / CAGrad: γ from the raw (unnormalised) Gram of the valid rewards; EMA (if any) on γ;
    γ is applied as is (no rescale): these methods define the update's scale themselves."""

    def _gram_coefficients(self, G: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _fresh(self, ng, G):
        t0 = time.perf_counter()
        idx = np.flatnonzero(ng.valid)
        sub = G[np.ix_(idx, idx)]
        gamma = np.zeros(G.shape[0])
        reason = None
        if not np.all(np.isfinite(sub)):
            reason = "nonfinite_gram"
            last = self._last_good
            gamma = last.copy() if last is not None else ng.valid.astype(np.float64)
        else:
            gamma[idx] = self._gram_coefficients((sub + sub.T) / 2)
            if not np.all(np.isfinite(gamma)):
                reason = "nonfinite_coefficients"
                gamma = ng.valid.astype(np.float64)
        ms = (time.perf_counter() - t0) * 1e3
        norm = float(np.sqrt(max(gamma[idx] @ sub @ gamma[idx], 0.0))) if reason is None else float("nan")
        return gamma, reason, ms, norm

    def _blend(self, prev, fresh, valid):
        if self.ema_decay is None or prev is None:
            return fresh.copy()
        return np.where(valid, self.ema_decay * prev + (1.0 - self.ema_decay) * fresh, prev)

    def _coefficients_to_gamma(self, coeffs, ng):
        return np.where(ng.valid, coeffs, 0.0)


@register_balancer("pcgrad")
class PCGradBalancer(_SurgeryBalancer):
    def __init__(self, cfg: Any, reward_names: list[str], micro_steps_per_batch: int = 1):
        super().__init__(cfg, reward_names, micro_steps_per_batch)
        self.rng = np.random.default_rng(cfg.seed)

    def _gram_coefficients(self, G):
        return pcgrad_coefficients(G, self.rng)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rng.bit_generator.state = state["rng"]


@register_balancer("cagrad")
class CAGradBalancer(_SurgeryBalancer):
    def _gram_coefficients(self, G):
        return cagrad_coefficients(G, self.cfg.c)
