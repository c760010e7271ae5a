"""Every reward's gradient from one backward (`marble.rl.per_sample`) against brute force: K backward
passes of the masked per-reward NFT losses (`nft.per_reward_losses`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from marble.rl.gram import stacked_gram
from marble.rl.nft import nft_terms, per_reward_losses
from marble.rl.per_sample import PerRewardLinearGrads, collinearity_residual, per_sample_coefficients

B, T, D, K, BETA = 6, 5, 4, 3, 0.1


class Toy(nn.Module):
    """Frozen layers with trained bias-free Linear adapters beside them (LoRA's shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(D, D)
        self.base.requires_grad_(False)
        self.down = nn.Linear(D, 2, bias=False)
        self.up = nn.Linear(2, D, bias=False)
        self.head = nn.Linear(D, D, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        h = torch.tanh(self.base(x) + self.up(self.down(x)))
        return self.head(h) + x


class ToyReused(Toy):
    """Toy whose head is called twice in one forward (its weight gradient sums both calls)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.base(x) + self.up(self.down(x)))
        return self.head(torch.tanh(self.head(h))) + x


def _batch(gen: torch.Generator):
    x0 = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    eps = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    t = torch.rand(B, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    mask = torch.rand(B, K, generator=gen) < 0.7
    mask[:, 0] = True
    c = mask.double() / mask.double().sum(0).clamp_min(1)
    r = torch.where(mask, torch.rand(B, K, generator=gen, dtype=torch.float64), torch.nan)  # NaN where masked
    return x0, x_t, t, c, r


def _brute(model, params, x0, x_t, t, c, r, v_old):
    terms = nft_terms(model(x_t), v_old, x_t, x0, t, BETA)
    losses = per_reward_losses(terms, c, r, BETA)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, params, retain_graph=True)]) for L in losses
    ]
    return torch.stack(rows)


def _one_backward(model, x0, x_t, t, c, r, v_old, **grads_kw):
    grads = PerRewardLinearGrads.of_trained(model, **grads_kw)
    with grads.capture():
        v = model(x_t)
        with torch.no_grad():
            model(x_t)  # an old / reference forward without a graph is ignored
        terms = nft_terms(v, v_old, x_t, x0, t, BETA)
        got = grads.per_reward_grads(terms.N.sum(), per_sample_coefficients(terms, c, r, BETA))
    assert grads.seconds > 0  # the products' own time, reported in time/balance_s
    return got, terms


def _both(seed: int, drift: float, model_cls=Toy, **grads_kw):
    """(one-backward gradients, K-backward gradients, terms) with the old adapter's velocity off the
    trained one by `drift` x noise."""
    gen = torch.Generator().manual_seed(seed)
    model = model_cls().double()
    params = [m.weight for m in (model.down, model.up, model.head)]
    x0, x_t, t, c, r = _batch(gen)
    with torch.no_grad():
        v_old = model(x_t) + drift * torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    got, terms = _one_backward(model, x0, x_t, t, c, r, v_old, **grads_kw)
    return got, _brute(model, params, x0, x_t, t, c, r, v_old), terms


def test_one_backward_equals_k_backward_passes_when_old_equals_trained():
    got, expected, terms = _both(seed=0, drift=0.0)  # p_i and q_i collinear
    assert float(collinearity_residual(terms).max()) < 1e-7
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stacked_gram(got), stacked_gram(expected), rtol=1e-9, atol=1e-12)


def test_a_layer_called_twice_sums_both_calls():
    got, expected, _ = _both(seed=2, drift=0.0, model_cls=ToyReused)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("group_bytes", [1, 10**9])  # every call alone; every same-shape call in one group
def test_grouping_same_shape_calls_gives_the_same_gradients(group_bytes):
    got, expected, _ = _both(seed=3, drift=0.0, model_cls=ToyReused, group_bytes=group_bytes)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_out_accumulates_in_place():
    gen = torch.Generator().manual_seed(4)
    model = Toy().double()
    grads = PerRewardLinearGrads.of_trained(model)
    x0, x_t, t, c, r = _batch(gen)
    with torch.no_grad():
        v_old = model(x_t)
    rows = []
    acc = None
    for _ in range(2):
        with grads.capture():
            terms = nft_terms(model(x_t), v_old, x_t, x0, t, BETA)
            s = per_sample_coefficients(terms, c, r, BETA)
            rows.append(grads.per_reward_grads(terms.N.sum(), s).clone())
        with grads.capture():
            terms = nft_terms(model(x_t), v_old, x_t, x0, t, BETA)
            acc = grads.per_reward_grads(terms.N.sum(), s, out=acc)
    assert acc.shape == (K, grads.num_params)
    torch.testing.assert_close(acc, rows[0] + rows[1], rtol=1e-12, atol=1e-14)


def test_error_is_bounded_by_the_collinearity_residual():
    got, expected, terms = _both(seed=1, drift=0.05)
    resid = float(collinearity_residual(terms).max())
    assert 1e-4 < resid < 0.1  # the drift is visible...
    rel = float((got - expected).norm() / expected.norm())
    assert 0 < rel < 2 * resid  # ...and the gradients are off by at most about that much


def test_refuses_a_trained_bias_and_unseen_layers():
    with pytest.raises(ValueError, match="bias"):
        PerRewardLinearGrads([nn.Linear(2, 2)])
    model = Toy()
    model.base.requires_grad_(True)
    with pytest.raises(ValueError, match="outside Linear weights"):
        PerRewardLinearGrads.of_trained(model)  # base.bias is trained but not a Linear weight
    model = Toy()
    grads = PerRewardLinearGrads.of_trained(model)
    x = torch.randn(B, T, D, requires_grad=True)
    with grads.capture(), pytest.raises(RuntimeError, match="3 trained layers got no gradient"):
        with torch.no_grad():
            model(x)  # no graph: nothing captured
        grads.per_reward_grads((x**2).sum(), torch.ones(B, K))
    with grads.capture(), pytest.raises(RuntimeError, match="2 trained layers got no gradient"):
        h = model.head(x)  # only head is reached by the root
        model.up(model.down(x))
        grads.per_reward_grads(h.sum(), torch.ones(B, K))


def test_capture_does_not_keep_the_layer_outputs_alive():
    """Only the outputs' gradient edges are kept: a LoRA-B output (full hidden width) that autograd does
    not save must be freed after the forward, as without the capture."""
    import gc
    import weakref

    model = Toy()
    outputs = []
    model.up.register_forward_hook(lambda m, i, o: outputs.append(weakref.ref(o)))
    grads = PerRewardLinearGrads.of_trained(model)
    x = torch.randn(B, T, D)
    with grads.capture():
        v = model(x)
        gc.collect()
        assert outputs[0]() is None  # `up`'s output fed only an addition, which saves nothing
        grads.per_reward_grads(v.square().sum(), torch.ones(B, K))


def test_capture_records_only_its_block_and_gives_the_layers_back():
    """Recording wraps each trained layer's forward on the instance while the block is open: a forward
    after the block is not recorded, the layers' forwards are their own again, and a forward that
    something else had wrapped on the instance (accelerate's module hooks do) is kept, not dropped."""
    model = Toy().double()
    params = [model.down.weight, model.up.weight, model.head.weight]
    wrapped_calls = []
    head_forward = model.head.forward
    model.head.forward = lambda x: (wrapped_calls.append(x.shape), head_forward(x))[1]
    grads = PerRewardLinearGrads.of_trained(model)
    x = torch.randn(B, T, D, dtype=torch.float64)
    with grads.capture():
        v = model(x)
        with pytest.raises(RuntimeError, match="already open"), grads.capture():
            pass
    w = model(x * 2)  # a forward with a graph after the block: not recorded
    ones = torch.ones(B, 1, dtype=torch.float64)
    got = grads.per_reward_grads(v.square().sum() + w.square().sum(), ones, retain_graph=True)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(v.square().sum(), params)])
    torch.testing.assert_close(got[0], expected, rtol=1e-10, atol=1e-12)
    assert "forward" not in vars(model.down) and "forward" not in vars(model.up)
    assert len(wrapped_calls) == 2  # the earlier wrapper ran inside the block and after it
    model(x)
    assert len(wrapped_calls) == 3


@pytest.mark.parametrize(
    "shape, dtype",
    [((B, D), torch.float64), ((B, 3, T, D), torch.float64), ((B, T, D), torch.bfloat16)],
    ids=["one token per sample", "a token grid", "bf16 operands"],
)
def test_operands_of_any_token_layout_and_dtype_give_the_weighted_per_sample_sums(shape, dtype):
    """A layer's input and output gradient are used as [B, tokens, features] at the promoted dtype: a
    call with no token axis, one with several, and bf16 operands (upcast) give Σ_i s_ik ∇_i, checked
    against one autograd pass per reward of the per-sample losses weighted by s_ik."""
    gen = torch.Generator().manual_seed(3)
    model = Toy().to(dtype)
    params = [model.down.weight, model.up.weight, model.head.weight]
    grads = PerRewardLinearGrads.of_trained(model)
    x = torch.randn(shape, generator=gen).to(dtype)
    s = torch.randn(B, K, generator=gen, dtype=torch.float64)
    promoted = torch.promote_types(dtype, torch.float32)
    with grads.capture():
        per_sample_loss = model(x).to(promoted).square().reshape(B, -1).sum(1)  # [B]
    got = grads.per_reward_grads(per_sample_loss.sum(), s, retain_graph=True)
    assert got.dtype == promoted
    expected = torch.stack([
        torch.cat([g.to(promoted).reshape(-1) for g in torch.autograd.grad(
            (s[:, k].to(promoted) * per_sample_loss).sum(), params, retain_graph=True)])
        for k in range(K)
    ])  # fmt: skip
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(got, expected, **tol)
