"""Balancer presets: registry, invariants, EMA, amortisation, fallbacks, exact state round trip,
PCGrad / CAGrad in Gram form (docs/algorithm.md §4)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from marble.config import (
    CAGradBalancer,
    EqualBalancer,
    GDPOBalancer,
    MarbleBalancer,
    MarbleFullBalancer,
    MarbleUBBalancer,
    PCGradBalancer,
    WeightedSumBalancer,
)
from marble.errors import CheckpointError
from marble.rl.advantages import optimality_probability
from marble.rl.balancers import BALANCERS, build_balancer, cagrad_coefficients, pcgrad_coefficients
from marble.rl.gram import gram_from_params
from marble.rl.nft import combine_coefficients, combined_loss, nft_terms, per_reward_losses, reward_weights

BETA, C = 0.5, 5.0
ALL_CONFIGS = [
    WeightedSumBalancer(weights=[1.0, 2.0, 1.0]),
    EqualBalancer(),
    GDPOBalancer(weights=[1.0, 0.5, 2.0]),
    MarbleBalancer(),
    MarbleFullBalancer(),
    MarbleUBBalancer(),
    PCGradBalancer(),
    CAGradBalancer(),
]
NAMES = ["a", "b", "c"]


def _grams(K: int, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        X = rng.normal(size=(K, 9)) * rng.uniform(0.1, 10, size=(K, 1)) + rng.normal(size=9)
        out.append(X @ X.T)
    return out


# ------------------------------------------------------------------------------- a tiny NFT problem
def _problem(R: torch.Tensor, seed: int = 0):
    """A float64 micro-batch whose policy is a small random network; returns a `grad_of(gamma, r, mask)`."""
    g = torch.Generator().manual_seed(seed)
    B = R.shape[0]
    net = torch.nn.Sequential(torch.nn.Linear(7, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6)).double()
    old = torch.nn.Sequential(torch.nn.Linear(7, 12), torch.nn.Tanh(), torch.nn.Linear(12, 6)).double()
    for m in (net, old):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x0 = torch.randn(B, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(B, 6, generator=g, dtype=torch.float64)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.8 + 0.1
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    inp = torch.cat([x_t, t[:, None]], 1)
    params = list(net.parameters())

    def terms():
        return nft_terms(net(inp), old(inp).detach(), x_t, x0, t, BETA)

    def flat(loss):
        return torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params, retain_graph=True)])

    def single_reward_nft(r):
        """Plain DiffusionNFT, one reward, every sample valid: C · mean_i [r P + (1 - r) N] / β."""
        tm = terms()
        return flat(C * (r * tm.P + (1 - r) * tm.N).mean() / BETA)

    return terms, flat, params, single_reward_nft


def _balanced_grad(balancer, R, gids, terms, flat, params):
    """What the trainer does for one micro-step (step 0, micro-step 0)."""
    r, mask = optimality_probability(balancer.objective_advantages(R, gids, "global"), C)
    tm = terms()
    c = reward_weights(mask, C)
    if balancer.needs_gram(0, 0):
        balancer.update(gram_from_params(per_reward_losses(tm, c, r, BETA), params).gram, step=0)
    omega, rho = combine_coefficients(balancer.gamma, c, r)
    return flat(combined_loss(tm, omega, rho, BETA)), r


# ------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: c.kind)
def test_every_preset_builds_with_the_trainer_interface(cfg):
    b = build_balancer(cfg, NAMES)
    assert type(b) is BALANCERS[cfg.kind]
    assert b.gram_source in (None, "params", "output")
    K = len(b.objective_names)
    R = torch.randn(6, 3, dtype=torch.float64)
    assert b.objective_advantages(R, torch.arange(6) // 3, "global").shape == (6, K)
    assert b.gamma.shape == (K,) and torch.isfinite(b.gamma).all()
    if b.gram_source is not None:
        assert b.needs_gram(0, 0)
        stats = b.update(torch.as_tensor(_grams(K, 1)[0]), step=0)
        assert stats.refreshed and stats.alpha.sum().item() == pytest.approx(1.0)
        metrics = stats.to_metrics(b.objective_names)
        assert {"balance/alpha/a", "balance/alpha_fresh/c", "balance/grad_norm/b", "balance/min_norm",
                "balance/qp_fallbacks", "balance/qp_ms"} <= set(metrics)  # fmt: skip
    else:
        assert not b.needs_gram(0, 0)
    assert "balance/alpha_fresh/" not in "".join(b.current_stats().to_metrics(b.objective_names))
    assert json.loads(json.dumps(b.state_dict())) == b.state_dict()


def test_unknown_kind_and_wrong_reward_shape_refused():
    class Fake:
        kind = "nope"

    with pytest.raises(ValueError, match="nope"):
        build_balancer(Fake(), NAMES)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        build_balancer(EqualBalancer(), NAMES).objective_advantages(torch.zeros(4, 2), [0, 0, 1, 1], "global")


# ----------------------------------------------------------------------------------- invariants
def test_weighted_sum_is_a_nan_aware_weighted_mean():
    b = build_balancer(WeightedSumBalancer(weights=[1.0, 3.0]), ["x", "y"])
    R = torch.tensor([[1.0, 2.0], [1.0, float("nan")], [float("nan"), float("nan")]], dtype=torch.float64)
    out = b.prepare_rewards(R)[:, 0].tolist()
    # (1·1 + 3·2)/4 = 1.75; only x applies -> 1; nothing applies -> NaN
    assert out[:2] == [1.75, 1.0] and math.isnan(out[2])
    assert b.objective_names == ["weighted_sum"] and b.gamma.tolist() == [1.0]


def test_weighted_sum_with_weights_1_0_equals_reward_0_alone():
    R = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    R[2, 1], R[5, 1] = float("nan"), float("inf")  # reward 1 is ignored, whatever its values
    gids = torch.arange(8) // 4
    terms, flat, params, _ = _problem(R)
    ws = build_balancer(WeightedSumBalancer(weights=[1.0, 0.0]), ["x", "y"])
    assert torch.equal(ws.prepare_rewards(R), R[:, :1])
    single = build_balancer(EqualBalancer(), ["x"])
    g_ws, _ = _balanced_grad(ws, R, gids, terms, flat, params)
    g_single, _ = _balanced_grad(single, R[:, :1], gids, terms, flat, params)
    assert torch.equal(g_ws, g_single)


def test_marble_with_one_reward_equals_single_reward_nft():
    R = torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 4
    gids = torch.arange(8) // 4
    terms, flat, params, single_reward_nft = _problem(R, seed=3)
    b = build_balancer(MarbleBalancer(), ["only"])
    g, r = _balanced_grad(b, R, gids, terms, flat, params)
    assert b.gamma.tolist() == [1.0]  # α = 1, γ = 1 · |g| / |g| exactly
    ref = single_reward_nft(r[:, 0])
    assert ((g - ref).abs().max() / ref.abs().max()).item() < 1e-12


def test_equal_with_a_one_hot_reward_set_equals_single_reward():
    R = torch.randn(8, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    gids = torch.arange(8) // 4
    terms, flat, params, single_reward_nft = _problem(R, seed=5)
    # the reward set {only}: α = 1 -> exactly single-reward NFT
    g1, r = _balanced_grad(build_balancer(EqualBalancer(), ["only"]), R, gids, terms, flat, params)
    ref = single_reward_nft(r[:, 0])
    assert ((g1 - ref).abs().max() / ref.abs().max()).item() < 1e-12
    # three rewards of which only the first ever applies: masked out, the update is ref / 3
    R3 = torch.cat([R, torch.full((8, 2), float("nan"), dtype=torch.float64)], 1)
    g3, _ = _balanced_grad(
        build_balancer(EqualBalancer(), ["only", "n1", "n2"]), R3, gids, terms, flat, params
    )
    assert ((3 * g3 - ref).abs().max() / ref.abs().max()).item() < 1e-12


def test_rescale_keeps_the_mean_gradient_scale():
    """Σ γ_k g_k == (Σ α_k ĝ_k) · mean|g| (normalize-and-rescale, §4.5)."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(3, 11)) * np.array([[0.1], [1.0], [30.0]])
    b = build_balancer(MarbleBalancer(ema_decay=None), NAMES)
    stats = b.update(torch.as_tensor(X @ X.T))
    norms = np.linalg.norm(X, axis=1)
    d = b.gamma.numpy() @ X
    expected = (stats.alpha.numpy() @ (X / norms[:, None])) * norms.mean()
    np.testing.assert_allclose(d, expected, rtol=1e-12)
    assert stats.min_norm == pytest.approx(np.linalg.norm(stats.alpha.numpy() @ (X / norms[:, None])))


def test_ema_stays_on_simplex_and_follows_the_formula():
    b = build_balancer(MarbleBalancer(ema_decay=0.7, refresh_every=1), NAMES)
    prev = None
    for step, G in enumerate(_grams(3, 12)):
        s = b.update(torch.as_tensor(G), step=step)
        a = s.alpha.numpy()
        assert a.min() >= 0 and abs(a.sum() - 1) < 1e-12
        expected = s.alpha_fresh.numpy() if prev is None else 0.7 * prev + 0.3 * s.alpha_fresh.numpy()
        np.testing.assert_allclose(a, expected, rtol=0, atol=1e-15)
        prev = a


@pytest.mark.parametrize("steps,n,accum", [(1, 10, 1), (10, 10, 2), (11, 10, 4), (25, 3, 3), (7, 1, 2)])
def test_refresh_every_n_solves_ceil_steps_over_n_times(steps, n, accum):
    b = build_balancer(MarbleBalancer(refresh_every=n), NAMES)
    grams = iter(_grams(3, steps * accum))
    for step in range(steps):
        for micro in range(accum):
            G = next(grams)
            if b.needs_gram(step, micro):
                b.update(torch.as_tensor(G), step=step)
    assert b.num_refreshes == math.ceil(steps / n)


def test_full_and_ub_refresh_every_micro_step():
    for cfg, source in ((MarbleFullBalancer(), "params"), (MarbleUBBalancer(), "output")):
        b = build_balancer(cfg, NAMES)
        assert b.gram_source == source
        calls = 0
        for step in range(4):
            for micro in range(3):
                if b.needs_gram(step, micro):
                    b.update(torch.eye(3), step=step)
                    calls += 1
        assert calls == 12


# ------------------------------------------------------------------------------------ fallbacks
def test_nonfinite_gram_falls_back_to_last_good_and_counts():
    b = build_balancer(MarbleBalancer(ema_decay=None, refresh_every=1), NAMES)
    good = b.update(torch.as_tensor(_grams(3, 1)[0]), step=0)
    G = _grams(3, 1, seed=9)[0]
    G[0, 1] = G[1, 0] = np.nan
    s = b.update(torch.as_tensor(G), step=1)
    assert s.qp_fallbacks == 1 and s.fallback_reason == "nonfinite_gram"
    assert torch.equal(s.alpha_fresh, good.alpha_fresh) and torch.isfinite(b.gamma).all()


def test_no_valid_reward_keeps_cached_weights():
    b = build_balancer(MarbleBalancer(refresh_every=1), NAMES)
    b.update(torch.as_tensor(_grams(3, 1)[0]), step=0)
    before = b.gamma.clone()
    s = b.update(torch.zeros(3, 3), step=1)
    assert s.fallback_reason == "no_valid_reward" and s.qp_fallbacks == 1
    assert torch.equal(b.gamma, before)


def test_invalid_reward_gets_zero_gamma():
    X = np.random.default_rng(0).normal(size=(3, 5))
    X[2] = 0.0
    b = build_balancer(MarbleBalancer(), NAMES)
    b.update(torch.as_tensor(X @ X.T))
    assert b.gamma[2].item() == 0.0 and (b.gamma[:2] > 0).all()


# ------------------------------------------------------------------------------------ state
@pytest.mark.parametrize("cfg", [MarbleBalancer(refresh_every=2), MarbleFullBalancer(ema_decay=0.5),
                                 PCGradBalancer(refresh_every=1), CAGradBalancer(refresh_every=1)],
                         ids=lambda c: c.kind)  # fmt: skip
def test_state_dict_round_trip_is_exact(cfg):
    grams = _grams(3, 10, seed=3)
    a = build_balancer(cfg, NAMES)
    for step, G in enumerate(grams[:5]):
        if a.needs_gram(step, 0):
            a.update(torch.as_tensor(G), step=step)
    b = build_balancer(cfg, NAMES)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # as a checkpoint would store it
    assert b.state_dict() == a.state_dict()
    for step, G in enumerate(grams[5:], start=5):
        for bal in (a, b):
            if bal.needs_gram(step, 0):
                bal.update(torch.as_tensor(G), step=step)
        assert a.gamma.numpy().tobytes() == b.gamma.numpy().tobytes()
    assert a.state_dict() == b.state_dict()


def test_load_state_refuses_other_kind_or_rewards():
    state = build_balancer(MarbleBalancer(), NAMES).state_dict()
    with pytest.raises(CheckpointError, match="kind"):
        build_balancer(MarbleFullBalancer(), NAMES).load_state_dict(state)
    with pytest.raises(CheckpointError, match="reward_names"):
        build_balancer(MarbleBalancer(), ["a", "b", "z"]).load_state_dict(state)


# ------------------------------------------------------------------------------ PCGrad / CAGrad
def _vector_pcgrad(grads: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """PCGrad as in Yu et al. 2020 (Alg. 1) on explicit vectors: returns Σ_i pc_g_i."""
    out = []
    for i in range(len(grads)):
        g = grads[i].copy()
        for j in rng.permutation(len(grads)):
            dot = g @ grads[j]
            if dot < 0:
                g = g - dot / (grads[j] @ grads[j]) * grads[j]
        out.append(g)
    return np.sum(out, 0)


def test_pcgrad_gram_form_equals_vector_pcgrad():
    rng = np.random.default_rng(0)
    conflicts = 0
    for trial in range(20):
        K = int(rng.integers(2, 7))
        X = rng.normal(size=(K, 8))
        conflicts += int(((X @ X.T) < 0).sum() > 0)
        gamma = pcgrad_coefficients(X @ X.T, np.random.default_rng(trial))
        np.testing.assert_allclose(
            gamma @ X, _vector_pcgrad(X, np.random.default_rng(trial)), rtol=1e-10, atol=1e-12
        )
    assert conflicts > 10


def test_pcgrad_without_conflict_is_the_plain_sum():
    X = np.abs(np.random.default_rng(1).normal(size=(4, 6)))  # all inner products positive
    assert pcgrad_coefficients(X @ X.T, np.random.default_rng(0)).tolist() == [1.0] * 4


def test_cagrad_sanity():
    rng = np.random.default_rng(3)
    K, c = 3, 0.4
    X = rng.normal(size=(K, 6)) + np.array([1.5, 0, 0, 0, 0, 0])
    G = X @ X.T
    # c = 0: CAGrad is the average gradient
    np.testing.assert_allclose(cagrad_coefficients(G, 0.0), np.full(K, 1 / K), rtol=1e-12)
    gamma = cagrad_coefficients(G, c)
    d = (gamma @ X) * (1 + c * c)  # undo the 1/(1+c²) rescale: d = g0 + λ g_w
    g0 = X.mean(0)
    # d lies on the ball |d - g0| <= c|g0| and maximises the worst inner product min_k <g_k, d> over it
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-9)
    worst = (X @ d).min()
    assert worst >= (X @ g0).min()
    u = rng.normal(size=(20000, 6))
    u = u / np.linalg.norm(u, axis=1, keepdims=True) * rng.uniform(0, 1, size=(20000, 1)) ** (1 / 6)
    samples = g0 + c * np.linalg.norm(g0) * u
    assert worst >= (samples @ X.T).min(1).max() - 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_cagrad_primal_and_dual_values_agree(seed):
    """Duality certificate: max_{|d-g0|<=c|g0|} min_k <g_k, d> = min_{w∈Δ} <g_w, g0> + c|g0||g_w|.
    The d built from γ is primal-feasible and the w recovered from γ dual-feasible; equal values
    prove both optimal."""
    rng = np.random.default_rng(seed)
    K, c = int(rng.integers(2, 7)), 0.4
    X = rng.normal(size=(K, 6)) + rng.uniform(0, 2) * rng.normal(size=6)
    G = X @ X.T
    gamma = cagrad_coefficients(G, c)
    z = gamma * (1 + c * c) - 1 / K  # = λ w
    w = z / z.sum()
    g0 = X.mean(0)
    dual = w @ G.sum(1) / K + c * np.linalg.norm(g0) * np.sqrt(w @ G @ w)
    primal = (X @ (gamma @ X * (1 + c * c))).min()
    assert w.min() >= 0 and abs(primal - dual) <= 1e-6 * abs(dual)
