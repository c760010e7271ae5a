"""The NFT loss, the affine single-backward (ω, ρ) update and the output-space Gram (docs/algorithm.md §3, §4.1).

Reference losses here are written independently, sample by sample, straight from the spec's formulas.
"""

from __future__ import annotations

import pytest
import torch

from marble.rl.advantages import group_advantages, optimality_probability
from marble.rl.gram import gram_from_output
from marble.rl.nft import (
    combine_coefficients,
    combined_loss,
    kl_loss,
    nft_terms,
    per_reward_losses,
    reward_weights,
)

BETA, C, FLOOR = 0.3, 2.0, 1e-5
SHAPE = (2, 3, 3)  # latent [C, h, w] -> D = 18
D = 18


@pytest.fixture(autouse=True)
def _float64_default():
    """Everything in this module in float64 (restored afterwards: other test modules share the process)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


class TinyVelocity(torch.nn.Module):
    """A small random network v(x_t, t) standing in for the transformer."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(D + 1, 16)
        self.l2 = torch.nn.Linear(16, D)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x_t, t):
        h = torch.tanh(self.l1(torch.cat([x_t.reshape(len(t), -1), t[:, None]], 1)))
        return self.l2(h).reshape(x_t.shape)


def _batch(B: int = 8, K: int = 3, seed: int = 0):
    """A micro-batch with NaN rewards (masks) and advantages large enough to be clipped."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, *SHAPE, generator=g)
    eps = torch.randn(B, *SHAPE, generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    x_t = (1 - t.reshape(B, 1, 1, 1)) * x0 + t.reshape(B, 1, 1, 1) * eps
    R = torch.randn(B, K, generator=g) * 3
    R[torch.rand(B, K, generator=g) < 0.35] = float("nan")
    R[0, 0] = 1.0  # every reward valid somewhere
    R[1, 0] = 40.0
    R[:, K - 1] = torch.where(torch.arange(B) < 3, R[:, K - 1], torch.tensor(float("nan")))
    R[0, K - 1], R[1, K - 1] = 1.0, 2.0
    adv = group_advantages(R, torch.arange(B) // 4).adv
    r, mask = optimality_probability(adv * 4, clip_max=C)  # * 4: many |A| > C, so r clips at 0 / 1
    return x0, x_t, t, r, mask


def _reference_reward_losses(v, v_old, x_t, x0, t, r, mask):
    """L_k = Σ_i c_ik l_i(r_ik), c_ik = C m_ik / max(1, Σ_j m_jk), sample by sample (§3)."""
    B, K = r.shape
    losses = []
    for k in range(K):
        n_valid = max(1, int(mask[:, k].sum()))
        total = torch.zeros(())
        for i in range(B):
            if not mask[i, k]:
                continue
            vp = BETA * v[i] + (1 - BETA) * v_old[i]
            vn = (1 + BETA) * v_old[i] - BETA * v[i]
            dp = x_t[i] - t[i] * vp - x0[i]
            dn = x_t[i] - t[i] * vn - x0[i]
            wp = dp.detach().abs().mean().clamp_min(FLOOR)
            wn = dn.detach().abs().mean().clamp_min(FLOOR)
            P = (dp**2).mean() / wp
            N = (dn**2).mean() / wn
            total = total + C / n_valid * (r[i, k] * P + (1 - r[i, k]) * N) / BETA
        losses.append(total)
    return losses


def test_single_backward_equals_sum_of_k_backwards():
    """Σ_k γ_k ∇L_k (K backward passes, reference losses) == ∇ of the (ω, ρ) loss (one backward)."""
    net, old = TinyVelocity(1), TinyVelocity(2)
    x0, x_t, t, r, mask = _batch()
    assert ((r == 0) | (r == 1)).any() and (~mask).any()  # clipping and masks are exercised
    params = list(net.parameters())
    worst = 0.0
    for trial in range(5):
        gamma = torch.randn(r.shape[1], generator=torch.Generator().manual_seed(trial)) * 3  # any sign
        v, v_old = net(x_t, t), old(x_t, t).detach()
        terms = nft_terms(v, v_old, x_t, x0, t, BETA, FLOOR)
        c = reward_weights(mask, C)
        omega, rho = combine_coefficients(gamma, c, r)
        one = torch.autograd.grad(combined_loss(terms, omega, rho, BETA), params, retain_graph=True)
        one = torch.cat([g.reshape(-1) for g in one])

        ref_losses = _reference_reward_losses(v, v_old, x_t, x0, t, r, mask)
        many = sum(
            gamma[k] * torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, params, retain_graph=True)])
            for k, L in enumerate(ref_losses)
        )
        worst = max(worst, ((one - many).abs().max() / many.abs().max()).item())
        # the vectorised per-reward losses equal the reference ones
        torch.testing.assert_close(
            per_reward_losses(terms, c, r, BETA), torch.stack(ref_losses), rtol=1e-12, atol=0
        )
    assert worst < 1e-10


def test_output_gram_three_scalars_equals_autograd():
    """H from (a, b, e) == Gram of the autograd gradients of L_k w.r.t. the model output v."""
    old = TinyVelocity(3)
    x0, x_t, t, r, mask = _batch(B=10, K=4, seed=5)
    v = (old(x_t, t) + 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))).detach()
    v.requires_grad_(True)
    v_old = old(x_t, t).detach()
    terms = nft_terms(v, v_old, x_t, x0, t, BETA, FLOOR)
    c = reward_weights(mask, C)
    H = gram_from_output(terms, c, r, BETA)
    losses = per_reward_losses(terms, c, r, BETA)
    J = torch.stack([torch.autograd.grad(L, v, retain_graph=True)[0].reshape(-1) for L in losses])  # [K, B*D]
    ref = J @ J.T
    assert ((H - ref).abs().max() / ref.abs().max()).item() < 1e-10
    # and the per-sample scalars themselves: a_i = |dP_i/dv_i|^2
    dP = torch.autograd.grad(terms.P.sum(), v, retain_graph=True)[0].reshape(len(t), -1)
    torch.testing.assert_close(terms.a, (dP**2).sum(1), rtol=1e-12, atol=0)


def test_adaptive_weight_floor_and_detached():
    x0 = torch.randn(2, *SHAPE)
    t = torch.tensor([0.5, 0.5])
    v = torch.zeros(2, *SHAPE, requires_grad=True)
    x_t = x0.clone()  # x0_pos = x_t - t v = x0 exactly -> weight floored
    terms = nft_terms(v, torch.zeros(2, *SHAPE), x_t, x0, t, BETA, FLOOR)
    assert terms.w_pos.tolist() == [FLOOR, FLOOR]
    assert terms.w_pos.dtype == torch.float64 and not terms.w_pos.requires_grad


def test_masked_entries_never_touch_r():
    c = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    r = torch.tensor([[0.2, float("nan")], [0.9, float("nan")]])
    omega, rho = combine_coefficients(torch.tensor([2.0, -1.0]), c, r)
    assert omega.tolist() == [2.0, 1.0] and rho.tolist() == [0.4, 0.9]


def test_reward_weights_mean_over_valid_times_clip():
    m = torch.tensor([[True, False], [True, False], [False, False], [True, False]])
    c = reward_weights(m, 5.0)
    assert c[:, 0].tolist() == [5 / 3, 5 / 3, 0.0, 5 / 3] and c[:, 1].tolist() == [0.0] * 4


def test_kl_loss_is_mean_squared_difference():
    v, ref = torch.randn(3, *SHAPE), torch.randn(3, *SHAPE)
    torch.testing.assert_close(kl_loss(v, ref), ((v - ref) ** 2).mean())


def test_half_precision_outputs_are_upcast():
    """bf16 model outputs (GPU autocast): P, N come out float32 and finite, weights float64."""
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(3, *SHAPE, generator=g), torch.randn(3, *SHAPE, generator=g)
    v = torch.randn(3, *SHAPE, generator=g).bfloat16().requires_grad_(True)
    terms = nft_terms(v, v.detach() * 0.9, x_t.bfloat16(), x0.bfloat16(), torch.full((3,), 0.5), BETA)
    assert terms.P.dtype == torch.float32 and torch.isfinite(terms.P).all()
    assert terms.w_neg.dtype == torch.float64
    terms.P.sum().backward()
    assert v.grad is not None and v.grad.dtype == torch.bfloat16
