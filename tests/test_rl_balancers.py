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
    MarblePaperBalancer,
    MarbleStepBalancer,
    MarbleUBBalancer,
    PCGradBalancer,
    WeightedSumBalancer,
)
from marble.errors import CheckpointError
from marble.rl.advantages import optimality_probability
from marble.rl.balancers import BALANCERS, build_balancer, cagrad_coefficients, pcgrad_coefficients
from marble.rl.gram import gram_from_output, gram_from_params
from marble.rl.nft import combine_coefficients, combined_loss, nft_terms, per_reward_losses, reward_weights

BETA, C = 0.5, 5.0
ALL_CONFIGS = [
    WeightedSumBalancer(weights=[1.0, 2.0, 1.0]),
    EqualBalancer(),
    GDPOBalancer(weights=[1.0, 0.5, 2.0]),
    MarbleBalancer(),
    MarblePaperBalancer(),
    MarbleFullBalancer(),
    MarbleStepBalancer(),
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


def _applied(balancer, G) -> torch.Tensor:
    """The γ a batch with Gram `G` gets (its diagonal stands for the batch's norms)."""
    return balancer.batch_gamma(torch.as_tensor(G) if balancer.needs_batch_gram else None).gamma


def _balanced_grad(balancer, R, gids, terms, flat, params):
    """What the trainer does for one micro-step (step 0, micro-step 0, the step's only one)."""
    r, mask = optimality_probability(balancer.objective_advantages(R, gids, "global"), C)
    tm = terms()
    c = reward_weights(mask, C)
    if balancer.needs_gram(0, 0):
        balancer.observe(gram_from_params(per_reward_losses(tm, c, r, BETA), params).gram, step=0)
    H = gram_from_output(tm, c, r, BETA)
    omega, rho = combine_coefficients(balancer.batch_gamma(H).gamma, c, r)
    balancer.end_step(0)
    return flat(combined_loss(tm, omega, rho, BETA)), r


# ------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: c.kind)
def test_every_preset_builds_with_the_trainer_interface(cfg):
    b = build_balancer(cfg, NAMES)
    assert type(b) is BALANCERS[cfg.kind]
    assert b.gram_source in (None, "params", "output", "per_sample")
    K = len(b.objective_names)
    R = torch.randn(6, 3, dtype=torch.float64)
    assert b.objective_advantages(R, torch.arange(6) // 3, "global").shape == (6, K)
    G = _grams(K, 1)[0]
    assert _applied(b, G).shape == (K,) and torch.isfinite(_applied(b, G)).all()
    if b.gram_source is not None:
        assert b.needs_gram(0, 0) != b.solves_step  # a step solver is given the step's Gram at its end
        stats = b.solve_step(torch.as_tensor(G), 0) if b.solves_step else b.update(torch.as_tensor(G), step=0)
        assert stats.refreshed and stats.alpha.sum().item() == pytest.approx(1.0)
        metrics = stats.to_metrics(b.objective_names)
        assert {"balance/alpha/a", "balance/alpha_fresh/c", "balance/grad_norm/b", "balance/min_norm",
                "balance/qp_fallbacks", "balance/qp_ms"} <= set(metrics)  # fmt: skip
    else:
        assert not b.needs_gram(0, 0)
    # between refreshes: α and the latest α* and norms (logged every step), no solve figures
    cached = b.current_stats().to_metrics(b.objective_names)
    assert "balance/min_norm" not in cached and f"balance/alpha/{b.objective_names[0]}" in cached
    assert ("balance/alpha_fresh/a" in cached) == (b.gram_source is not None)
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
    assert b.batch_gamma(torch.ones(1, 1)).gamma.tolist() == [1.0]  # α = 1, γ = 1 · |g| / |g| exactly
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


@pytest.mark.parametrize("cfg", [MarblePaperBalancer(ema_decay=None), MarbleBalancer(ema_decay=None, gamma_cap=None)],
                         ids=["cached_norms", "batch_norms"])  # fmt: skip
def test_rescale_keeps_the_mean_gradient_scale(cfg):
    """Σ γ_k g_k == (Σ α_k ĝ_k) · mean|g| (normalize-and-rescale, §4.5), whether the norms were
    cached at the refresh or read from the batch (here the same batch)."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(3, 11)) * np.array([[0.1], [1.0], [30.0]])
    b = build_balancer(cfg, NAMES)
    stats = b.update(torch.as_tensor(X @ X.T))
    norms = np.linalg.norm(X, axis=1)
    d = _applied(b, X @ X.T).numpy() @ X
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
def test_refresh_every_n_steps(steps, n, accum):
    """The first step observes every micro-step (§4.6), then every n-th step: a per-micro-batch
    refresh (the paper) on its first micro-step; a step refresh once per step, at `end_step`."""
    for cfg, expected in (
        (MarblePaperBalancer(refresh_every=n), accum + math.ceil(steps / n) - 1),
        (MarbleBalancer(refresh_every=n), math.ceil(steps / n)),
    ):
        b = build_balancer(cfg, NAMES)
        grams = iter(_grams(3, steps * accum))
        for step in range(steps):
            for micro in range(accum):
                G = next(grams)
                if b.needs_gram(step, micro):
                    b.observe(torch.as_tensor(G), step, micro)
            b.end_step(step)
        assert b.num_refreshes == expected, cfg.kind


def test_full_and_ub_refresh_every_micro_step():
    for cfg, source in ((MarbleFullBalancer(), "per_sample"), (MarbleUBBalancer(), "output")):
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
    b = build_balancer(MarblePaperBalancer(ema_decay=None, refresh_every=1), NAMES)
    good = b.update(torch.as_tensor(_grams(3, 1)[0]), step=0)
    G = _grams(3, 1, seed=9)[0]
    G[0, 1] = G[1, 0] = np.nan
    s = b.update(torch.as_tensor(G), step=1)
    assert s.qp_fallbacks == 1 and s.fallback_reason == "nonfinite_gram"
    assert torch.equal(s.alpha_fresh, good.alpha_fresh) and torch.isfinite(b.gamma).all()


def test_no_valid_reward_keeps_cached_weights():
    b = build_balancer(MarblePaperBalancer(refresh_every=1), NAMES)
    b.update(torch.as_tensor(_grams(3, 1)[0]), step=0)
    before = b.gamma.clone()
    s = b.update(torch.zeros(3, 3), step=1)
    assert s.fallback_reason == "no_valid_reward" and s.qp_fallbacks == 1
    assert torch.equal(b.gamma, before)


@pytest.mark.parametrize("cfg", [MarblePaperBalancer(), MarbleBalancer()], ids=lambda c: c.kind)
def test_reward_invalid_on_the_batch_gets_zero_gamma_there(cfg):
    X = np.random.default_rng(0).normal(size=(3, 5))
    X[2] = 0.0
    b = build_balancer(cfg, NAMES)
    b.update(torch.as_tensor(X @ X.T))
    gamma = _applied(b, X @ X.T)
    assert gamma[2].item() == 0.0 and (gamma[:2] > 0).all()


# ------------------------------------------------------------------------------------ state
def _drive(bal, grams, steps, accum=3):
    """Trainer protocol over `steps` (each `accum` micro-steps); returns the applied γ of each."""
    out = []
    for step in steps:
        for micro in range(accum):
            G = torch.as_tensor(grams[(step * accum + micro) % len(grams)])
            if bal.needs_gram(step, micro):
                bal.observe(G, step, micro)
            out.append(_applied(bal, G).numpy().tobytes())
        bal.end_step(step)
    return out


@pytest.mark.parametrize("cfg", [MarbleBalancer(refresh_every=2), MarblePaperBalancer(refresh_every=2),
                                 MarbleFullBalancer(ema_decay=0.5), MarbleUBBalancer(ema_decay=0.3),
                                 PCGradBalancer(refresh_every=1), CAGradBalancer(refresh_every=1)],
                         ids=lambda c: c.kind)  # fmt: skip
def test_state_dict_round_trip_is_exact(cfg):
    """A balancer restored from its JSON state at a step boundary applies bitwise the same γ as the
    uninterrupted one from then on (resume equals uninterrupted)."""
    grams = _grams(3, 17, seed=3)
    a = build_balancer(cfg, NAMES)
    _drive(a, grams, range(5))
    b = build_balancer(cfg, NAMES)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # as a checkpoint would store it
    assert b.state_dict() == a.state_dict()
    assert _drive(a, grams, range(5, 12)) == _drive(b, grams, range(5, 12))
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


# ------------------------------------------------------------- an amortised balancer that stays aligned
def _simplex_min_norm(G: np.ndarray, step: float = 1 / 400) -> tuple[np.ndarray, float]:
    """Brute force for K = 3: the grid point of the simplex with the smallest αᵀ Ĝ α."""
    d = np.sqrt(np.diag(G))
    Gh = G / np.outer(d, d)
    a = np.arange(0, 1 + step / 2, step)
    A0, A1 = np.meshgrid(a, a, indexing="ij")
    keep = A0 + A1 <= 1 + 1e-12
    P = np.stack([A0[keep], A1[keep], 1 - A0[keep] - A1[keep]], 1)  # [n, 3]
    vals = np.einsum("ni,ij,nj->n", P, Gh, P)
    return P[vals.argmin()], float(vals.min())


def _conflicting_grams(n: int, seed: int) -> list[np.ndarray]:
    """Grams of three gradients where the third conflicts with the first two (a non-trivial α*)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        X = rng.normal(size=(3, 6)) * 0.3 + np.array(
            [[1, 0, 0, 0, 0, 0], [0.6, 0.8, 0, 0, 0, 0], [-0.7, 0.2, 0, 0, 0, 0]]
        )
        out.append(X @ X.T)
    return out


def test_refresh_covers_every_micro_batch_of_the_step():
    """A refresh step observes the first timestep slot of EVERY micro-batch (the first refresh step:
    every micro-step), and its α* is the min-norm point of their summed Gram."""
    T, accum = 4, 3  # micro-steps are micro-batch-major: micro = micro_batch * T + slot
    cfg = MarbleBalancer(
        gram_source="params", refresh_every=2, refresh_micro_steps="first_slot", ema_decay=0.7
    )
    b = build_balancer(cfg, NAMES, micro_steps_per_batch=T)
    grams = _conflicting_grams(3 * accum * T, seed=7)
    observed, alphas = {}, {}
    for step in range(3):
        observed[step] = []
        for micro in range(accum * T):
            if b.needs_gram(step, micro):
                observed[step].append(micro)
                b.observe(torch.as_tensor(grams[step * accum * T + micro]), step, micro)
        alphas[step] = (b.end_step(step), b.current_stats().alpha.numpy())
    assert observed == {0: list(range(accum * T)), 1: [], 2: [0, T, 2 * T]}
    summed = sum(grams[2 * accum * T + m] for m in observed[2])
    brute, brute_val = _simplex_min_norm(summed)
    fresh = alphas[2][0].alpha_fresh.numpy()
    d = np.sqrt(np.diag(summed))
    assert fresh @ (summed / np.outer(d, d)) @ fresh <= brute_val + 1e-12  # at least as good as the grid
    np.testing.assert_allclose(fresh, brute, atol=5e-3)
    # committed: the EMA (ρ = 0.7) of the step-0 α with this α* (all rewards valid)
    np.testing.assert_allclose(alphas[2][1], 0.7 * alphas[0][1] + 0.3 * fresh, rtol=0, atol=1e-12)


def test_output_gram_refresh_sums_every_micro_step_of_every_step():
    """The default (free output-space Gram): every micro-step of every step feeds one solve per step."""
    b = build_balancer(MarbleBalancer(), NAMES, micro_steps_per_batch=2)
    assert b.gram_source == "output" and b.refresh == "step"
    grams = _conflicting_grams(12, seed=3)
    for step in range(2):
        for micro in range(6):
            assert b.needs_gram(step, micro)
            b.observe(torch.as_tensor(grams[step * 6 + micro]), step, micro)
        committed = b.end_step(step)
        brute, _ = _simplex_min_norm(sum(grams[step * 6 : step * 6 + 6]))
        np.testing.assert_allclose(committed.alpha_fresh.numpy(), brute, atol=5e-3)
    assert b.num_refreshes == 2


@pytest.mark.parametrize(
    "cfg", [MarbleBalancer(), MarblePaperBalancer(refresh_every=1)], ids=lambda c: c.kind
)
def test_reward_invalid_in_a_refresh_keeps_its_smoothed_alpha(cfg):
    b = build_balancer(cfg, NAMES)
    G0, G1 = _conflicting_grams(2, seed=1)
    b.update(torch.as_tensor(G0), step=0)
    before = b.current_stats().alpha.numpy()
    G1[2, :] = G1[:, 2] = 0.0  # reward c has no valid sample in this refresh
    s = b.update(torch.as_tensor(G1), step=1)
    after = s.alpha.numpy()
    fresh = s.alpha_fresh.numpy()
    assert fresh[2] == 0.0 and after[2] == before[2]  # c keeps its smoothed α ...
    # ... and a, b share the mass they had: α_V ← ρ α_V + (1 - ρ) m_V α*_V
    mass, rho = before[:2].sum(), b.ema_decay
    np.testing.assert_allclose(after[:2], rho * before[:2] + (1 - rho) * mass * fresh[:2], atol=1e-14)
    assert after.sum() == pytest.approx(1.0, abs=1e-14)


def test_gamma_is_bounded_when_one_reward_gradient_is_tiny():
    """A reward whose gradient is tiny on the refresh batch cannot take later updates (γ normalised by
    the batch being applied), and on the tiny batch itself γ_k <= cap α_k."""
    rng = np.random.default_rng(4)
    XA = rng.normal(size=(3, 8))
    XA[2] *= 1e-6  # batch A: reward c barely has a gradient
    XB = rng.normal(size=(3, 8))  # batch B: ordinary
    b = build_balancer(MarbleBalancer(), NAMES)
    b.update(torch.as_tensor(XA @ XA.T), step=0)
    alpha = b.current_stats().alpha.numpy()
    gA = _applied(b, XA @ XA.T).numpy()
    assert gA[2] <= b.gamma_cap * alpha[2] + 1e-12
    gB = _applied(b, XB @ XB.T).numpy()
    contrib = gB * np.linalg.norm(XB, axis=1)  # |γ_k g_k| on batch B
    np.testing.assert_allclose(contrib / contrib.sum(), alpha, rtol=1e-12)  # each reward its α share
    assert contrib[2] / contrib.sum() < 0.5


def test_specialist_missing_from_one_refresh_micro_batch_is_not_zeroed_for_the_window():
    accum = 3
    cfg = MarbleBalancer(gram_source="params", refresh_every=3, refresh_micro_steps="first_slot")
    b = build_balancer(cfg, NAMES, micro_steps_per_batch=1)
    grams = _conflicting_grams(6 * accum, seed=5)
    for step in (3, 4, 5):  # micro-batch 0 of these steps: the specialist c has no valid sample
        grams[step * accum][2, :] = grams[step * accum][:, 2] = 0.0
    gammas = []
    for step in range(6):
        for micro in range(accum):
            G = torch.as_tensor(grams[step * accum + micro])
            if b.needs_gram(step, micro):
                b.observe(G, step, micro)
            gammas.append(_applied(b, G).numpy())
        b.end_step(step)
    # steps 4 and 5 apply the step-3 refresh (which began on the micro-batch without c): c is weighted
    # wherever it has valid samples, and only there
    for step in (4, 5):
        assert gammas[step * accum][2] == 0.0
        assert all(gammas[step * accum + m][2] > 0.05 for m in (1, 2))


def test_first_step_refreshes_on_every_micro_step():
    """§4.6: the refresh of step 0 uses all its micro-steps. The paper's schedule refreshes on each
    (α* of that micro-batch, EMA); marble sums them and applies, on each micro-step, the min-norm α of
    the Gram summed so far (then commits the whole step's)."""
    T, accum = 2, 3
    grams = _conflicting_grams(accum * T, seed=11)
    paper = build_balancer(MarblePaperBalancer(), NAMES, micro_steps_per_batch=T)
    cfg = MarbleBalancer(gram_source="params", refresh_every=10, refresh_micro_steps="first_slot")
    ours = build_balancer(cfg, NAMES, micro_steps_per_batch=T)
    for micro, G in enumerate(grams):
        assert paper.needs_gram(0, micro) and ours.needs_gram(0, micro)
        paper.observe(torch.as_tensor(G), 0, micro)
        s = ours.observe(torch.as_tensor(G), 0, micro)
        brute, _ = _simplex_min_norm(sum(grams[: micro + 1]))
        np.testing.assert_allclose(s.alpha_fresh.numpy(), brute, atol=5e-3)
        np.testing.assert_allclose(ours.current_stats().alpha.numpy(), s.alpha_fresh.numpy(), atol=1e-12)
    paper.end_step(0)
    ours.end_step(0)
    assert paper.num_refreshes == accum * T and ours.num_refreshes == 1
    assert not paper.needs_gram(1, 0) and not ours.needs_gram(1, 0)


# ------------------------------------------------------------------------------ marble_step
def test_step_solver_applies_the_fresh_mgda_of_the_steps_gram_and_keeps_no_ema():
    """marble_step: no micro-step asks for a Gram; each step's solve gives exactly the fresh normalised
    MGDA γ of that step's Gram (no EMA, norms from that Gram), so the step's update `Σ γ_k g_k` has a
    non-negative inner product with every reward's step gradient; before the first solve γ = 1/K."""
    from marble.rl.balancers import mgda_gamma

    b = build_balancer(MarbleStepBalancer(), NAMES)
    assert b.solves_step and b.gram_source == "per_sample"
    assert not any(b.needs_gram(s, m) for s in range(3) for m in range(4))
    assert torch.allclose(b.gamma, torch.full((3,), 1 / 3, dtype=torch.float64))
    rng = np.random.default_rng(5)
    for step in range(4):
        X = rng.normal(size=(3, 11)) * np.array([[0.01], [1.0], [30.0]]) + 0.2 * rng.normal(size=11)
        X[0] = -X[2] * 0.5 + 0.01 * rng.normal(size=11)  # two rewards in conflict, one tiny
        G = torch.as_tensor(X @ X.T)
        stats = b.solve_step(G, step)
        assert stats.refreshed and b.num_refreshes == step + 1
        torch.testing.assert_close(b.gamma, mgda_gamma(G), rtol=1e-9, atol=1e-12)  # fresh, no EMA
        d_dot_g = (torch.as_tensor(X).T @ b.gamma) @ torch.as_tensor(X).T  # [K] <Σ γ_j g_j, g_k>
        assert (d_dot_g >= -1e-9 * float(G.diagonal().max())).all(), d_dot_g


def test_step_solver_config_refuses_what_would_break_the_step_alignment():
    from pydantic import ValidationError

    for bad in ({"ema_decay": 0.5}, {"gram_source": "output"}, {"refresh_every": 10}, {"normalize": "batch"}):
        with pytest.raises(ValidationError):
            MarbleStepBalancer(**bad)
