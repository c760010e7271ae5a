"""Balancers: how K per-reward gradients become one update (docs/algorithm.md §4). A registry keyed by
the config's `kind`; the trainer uses this one interface and never branches on the name.

Trainer usage, per micro-step (b = index of the micro-batch rows)::

    balancer = build_balancer(cfg.balancer, cfg.trained_reward_names)
    adv = balancer.objective_advantages(R_raw, group_ids, cfg.nft.std_mode)  # [N, K'] (weighted_sum, gdpo: 1)
    r, mask = optimality_probability(adv, C)                # [N, K'] each
    terms = nft_terms(v, v_old, x_t, x0, t, beta, floor)
    c = reward_weights(mask[b], C)                          # [B, K']
    if balancer.needs_gram(step, micro_step):               # False for weighted_sum / equal
        if balancer.gram_source == "params":
            G = gram_from_params(per_reward_losses(terms, c, r[b], beta), params, all_reduce=...).gram
        else:                                               # "output": free
            G = gram_from_output(terms, c, r[b], beta)
        stats = balancer.update(G, step=step)               # refreshed=True
    else:
        stats = balancer.current_stats()                    # refreshed=False (cached α)
    omega, rho = combine_coefficients(balancer.gamma, c, r[b])
    loss = combined_loss(terms, omega, rho, beta) + kl_weight * kl_loss(v, v_ref)   # ONE backward
    metrics.update(stats.to_metrics(balancer.objective_names))

Interface notes (refinements of the contract, all additive):
- `update(G, step=None)`: optional `step` records the optimizer step of the refresh (state_dict).
- `current_stats()` returns the cached α/γ without solving; `BalanceStats.to_metrics(names)` gives the
  §6 metric names (`balance/alpha/<k>` every step; `alpha_fresh`, `grad_norm`, `min_norm` at refresh).
- `gram.gram_from_params` returns a `ParamGram` NamedTuple (`.gram`, `.norms`, `.grads`, `.nonfinite`);
  its `all_reduce` hook is applied to the stacked gradients `[K, P]` (exact for DDP), not to the Gram.
- `state_dict()` is plain JSON-serialisable Python (floats round-trip exactly); `load_state_dict`
  refuses a state of another kind or reward list with a `CheckpointError` naming the field.
- Refresh schedule of the Gram presets: optimizer steps 0, n, 2n, ... (n = `refresh_every`), on the
  first micro-step only, or on every micro-step of those steps when `per_micro_step`; always when no
  refresh has happened yet.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from marble.errors import CheckpointError
from marble.rl.advantages import gdpo_advantages, group_advantages
from marble.rl.gram import NormalizedGram, normalize_gram
from marble.rl.qp import MinNormSolver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BalanceStats:
    """What one balancer step did (every tensor `[K']` float64)."""

    alpha: Tensor  # applied weights on the simplex (EMA α; γ/Σγ for PCGrad/CAGrad)
    gamma: Tensor  # coefficients applied through (ω, ρ)
    refreshed: bool  # a Gram was consumed at this call
    alpha_fresh: Tensor | None = None  # this refresh's solution before the EMA (normalised to Σ = 1)
    grad_norms: Tensor | None = None  # |g_k| of this refresh's Gram (NaN if not finite)
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
        if self.refreshed:
            if self.alpha_fresh is not None:
                out.update(
                    {
                        f"balance/alpha_fresh/{n}": float(a)
                        for n, a in zip(names, self.alpha_fresh, strict=True)
                    }
                )
            if self.grad_norms is not None:
                out.update(
                    {f"balance/grad_norm/{n}": float(g) for n, g in zip(names, self.grad_norms, strict=True)}
                )
            if self.min_norm is not None:
                out["balance/min_norm"] = float(self.min_norm)
            out["balance/qp_ms"] = float(self.qp_ms)
        return out


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


def build_balancer(cfg: Any, reward_names: list[str]) -> Balancer:
    """Build the balancer selected by `cfg.kind` (a `marble.config` balancer node)."""
    try:
        cls = BALANCERS[cfg.kind]
    except KeyError:
        raise ValueError(f"balancer.kind={cfg.kind!r} is not one of {sorted(BALANCERS)}") from None
    if not reward_names:
        raise ValueError("build_balancer: at least one trained reward is needed")
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
        """Whether `update` wants a Gram at this (optimizer step, micro-step)."""
        return False

    def update(self, gram: Tensor, step: int | None = None) -> BalanceStats:
        raise RuntimeError(f"balancer {self.kind!r} uses no Gram; needs_gram() is always False")

    @property
    def gamma(self) -> Tensor:
        """Coefficients `[K']` (float64) to apply through (ω, ρ) now."""
        return _t(self._gamma)

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
class GDPOBalancer(Balancer):
    """GDPO (arXiv 2601.05242, §3): one advantage per sample, the batch-whitened weighted sum of the
    per-reward group-normalised advantages (`advantages.gdpo_advantages`); `nft.std_mode` does not
    apply (GDPO fixes its normalisations). Applied like `weighted_sum`: one objective, γ = [1]."""

    def __init__(self, cfg: Any, reward_names: list[str]):
        super().__init__(cfg, reward_names)
        weights = cfg.weights if cfg.weights is not None else [1.0] * len(reward_names)
        if len(weights) != len(reward_names):
            raise ValueError(f"balancer.weights has {len(weights)} entries for rewards {reward_names}")
        self.weights = torch.tensor(weights, dtype=torch.float64)  # [K]

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


class GramBalancer(Balancer):
    """Shared machinery of the Gram-based presets: refresh schedule, EMA, fallbacks, cached state.

    Subclasses implement `_fresh(ng, G) -> (coefficients, reason, qp_ms, min_norm)` and
    `_coefficients_to_gamma(coeffs, ng)`."""

    def __init__(self, cfg: Any, reward_names: list[str]):
        super().__init__(cfg, reward_names)
        self.gram_source = cfg.gram_source
        self.refresh_every: int = cfg.refresh_every
        self.ema_decay: float | None = cfg.ema_decay
        self.per_micro_step: bool = bool(getattr(cfg, "per_micro_step", False))
        K = len(reward_names)
        self._coeffs: np.ndarray | None = None  # EMA'd α (MGDA) or γ (PCGrad/CAGrad)
        self._last_good: np.ndarray | None = None  # last non-fallback fresh solution
        self._norms: np.ndarray | None = None  # cached |g_k| of the last usable refresh
        self._gamma = np.full(K, 1.0 / K)  # before any refresh: equal weights
        self._num_refreshes = 0
        self._fallbacks = 0
        self._last_refresh_step: int | None = None

    def needs_gram(self, step: int, micro_step: int) -> bool:
        if self._num_refreshes == 0:
            return True
        if step % self.refresh_every:
            return False
        return self.per_micro_step or micro_step == 0

    def _fresh(self, ng: NormalizedGram, G: np.ndarray) -> tuple[np.ndarray, str | None, float, float]:
        raise NotImplementedError

    def _coefficients_to_gamma(self, coeffs: np.ndarray, ng: NormalizedGram) -> np.ndarray:
        raise NotImplementedError

    def update(self, gram: Tensor, step: int | None = None) -> BalanceStats:
        """Consume a fresh Gram `[K', K']`: solve, EMA, cache α and norms, recompute γ."""
        G = np.array(torch.as_tensor(gram).detach().cpu().to(torch.float64), dtype=np.float64)  # [K, K]
        if G.shape != (len(self.objective_names),) * 2:
            raise ValueError(f"Gram must be [{len(self.objective_names)}]*2, got {G.shape}")
        ng = normalize_gram(G)
        self._num_refreshes += 1
        self._last_refresh_step = step
        if not ng.valid.any():
            # Nothing to learn from (every gradient zero or not finite): keep the cached α and γ.
            self._fallbacks += 1
            log.warning(
                "balancer %s: no valid reward gradient at step %s; keeping cached weights", self.kind, step
            )
            return self._stats(None, ng.norms, None, "no_valid_reward", 0.0)
        fresh, reason, qp_ms, min_norm = self._fresh(ng, G)
        if reason is None:
            self._last_good = fresh
        else:
            self._fallbacks += 1
        if self._coeffs is None or self.ema_decay is None:
            self._coeffs = fresh.copy()
        else:  # §4.4: α ← ρ α + (1 - ρ) α*, a convex combination (stays on the simplex)
            self._coeffs = self.ema_decay * self._coeffs + (1.0 - self.ema_decay) * fresh
        self._norms = ng.norms
        self._gamma = self._coefficients_to_gamma(self._coeffs, ng)
        return self._stats(fresh, ng.norms, min_norm, reason, qp_ms)

    def _alpha(self) -> np.ndarray:
        return _on_simplex(self._coeffs if self._coeffs is not None else self._gamma)

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
        return BalanceStats(
            alpha=_t(self._alpha()),
            gamma=_t(self._gamma),
            refreshed=False,
            qp_fallbacks=self._fallbacks,
            num_refreshes=self._num_refreshes,
        )

    @property
    def num_refreshes(self) -> int:
        return self._num_refreshes

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "coeffs": _floats(self._coeffs),
            "last_good": _floats(self._last_good),
            "norms": _floats(self._norms),
            "gamma": _floats(self._gamma),
            "num_refreshes": self._num_refreshes,
            "fallbacks": self._fallbacks,
            "last_refresh_step": self._last_refresh_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._coeffs = _array(state["coeffs"])
        self._last_good = _array(state["last_good"])
        self._norms = _array(state["norms"])
        self._gamma = _array(state["gamma"])
        self._num_refreshes = int(state["num_refreshes"])
        self._fallbacks = int(state["fallbacks"])
        self._last_refresh_step = state["last_refresh_step"]


def rescale_to_gamma(alpha: np.ndarray, norms: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Normalize-and-rescale (§4.5): `γ_k = α_k · mean_valid |g_j| / |g_k|`, 0 for invalid rewards, so
    the update `Σ γ_k g_k = (Σ α_k ĝ_k) · mean |g|` keeps the scale of the raw gradients."""
    if not valid.any():
        return np.zeros_like(alpha)
    scale = float(norms[valid].mean())
    safe = np.where(valid, norms, 1.0)
    return np.where(valid, alpha * scale / safe, 0.0)


@register_balancer("marble", "marble_full", "marble_ub")
class MGDABalancer(GramBalancer):
    """MARBLE: normalised MGDA min-norm weights, EMA, normalize-and-rescale (§4). The three presets
    differ only in their config (Gram source, refresh schedule, EMA)."""

    def __init__(self, cfg: Any, reward_names: list[str]):
        super().__init__(cfg, reward_names)
        self.solver = MinNormSolver(eps=cfg.qp_eps, max_iter=cfg.qp_max_iter)

    def _fresh(self, ng, G):
        res = self.solver.solve(ng.gram_hat, ng.valid, fallback=self._last_good)
        return res.alpha, res.fallback_reason, res.solve_ms, res.min_norm

    def _coefficients_to_gamma(self, coeffs, ng):
        return rescale_to_gamma(coeffs, ng.norms, ng.valid)


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

    def _coefficients_to_gamma(self, coeffs, ng):
        return np.where(ng.valid, coeffs, 0.0)


@register_balancer("pcgrad")
class PCGradBalancer(_SurgeryBalancer):
    def __init__(self, cfg: Any, reward_names: list[str]):
        super().__init__(cfg, reward_names)
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
