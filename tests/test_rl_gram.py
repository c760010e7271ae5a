"""Parameter-space Gram (K backward passes) and its normalisation (docs/algorithm.md §4.1-4.2)."""

from __future__ import annotations

import numpy as np
import torch

from marble.rl.gram import flat_grads, gram_from_params, normalize_gram, stacked_gram


def _net_and_losses(K: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    targets = torch.randn(K, 6, 4, generator=g, dtype=torch.float64)
    out = net(x)
    losses = torch.stack([((out - targets[k]) ** 2).mean() for k in range(K)])
    return net, losses


def test_gram_equals_explicit_gradients_and_leaves_grad_untouched():
    net, losses = _net_and_losses()
    params = list(net.parameters())
    res = gram_from_params(losses, params, keep_grads=True)
    explicit = []
    for L in losses:
        gs = torch.autograd.grad(L, params, retain_graph=True)
        explicit.append(torch.cat([x.reshape(-1) for x in gs]))
    E = torch.stack(explicit)
    torch.testing.assert_close(res.grads, E, rtol=0, atol=0)
    torch.testing.assert_close(res.gram, E @ E.T, rtol=1e-13, atol=0)
    torch.testing.assert_close(res.norms, E.norm(dim=1), rtol=1e-13, atol=0)
    assert all(p.grad is None for p in params)  # training's .grad accumulation is not touched
    losses.sum().backward()  # the graph was retained for the training backward


def test_frozen_and_unused_params():
    net, losses = _net_and_losses()
    unused = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)
    res = gram_from_params(losses, [*net.parameters(), unused, frozen], keep_grads=True)
    n_trainable = sum(p.numel() for p in net.parameters()) + 3
    assert res.grads.shape == (3, n_trainable) and (res.grads[:, -3:] == 0).all()


def test_nonfinite_gradients_are_zeroed_and_counted():
    p = torch.nn.Parameter(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    # d/dp0 of sqrt(p0) at 0 is inf: reward 1's gradient has one non-finite entry
    losses = [(p * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum(), torch.sqrt(p[0]) + p[1]]
    res = gram_from_params(losses, [p], keep_grads=True)
    assert res.nonfinite.tolist() == [0.0, 1.0]
    assert res.grads[1].tolist() == [0.0, 1.0, 0.0]
    assert torch.isfinite(res.gram).all() and res.gram[0, 1].item() == 2.0


def test_all_reduce_hook_sees_stacked_grads():
    net, losses = _net_and_losses(K=2)
    seen = []

    def fake_reduce(grads):  # stands in for accelerator.reduce(grads, "mean") over 2 ranks
        seen.append(tuple(grads.shape))
        return grads * 2.0

    base = gram_from_params(losses, list(net.parameters())).gram
    reduced = gram_from_params(losses, list(net.parameters()), all_reduce=fake_reduce).gram
    assert seen == [(2, sum(p.numel() for p in net.parameters()))]
    torch.testing.assert_close(reduced, 4.0 * base, rtol=1e-14, atol=0)


def test_chunked_gram_matches_float64_matmul():
    g = torch.randn(3, (1 << 15) + 17, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    ref = g.double() @ g.double().T
    torch.testing.assert_close(stacked_gram(g), ref, rtol=1e-12, atol=0)


def test_normalize_gram_validity():
    X = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    G = X @ X.T
    G[2, 2] = np.nan  # norm not finite -> invalid
    ng = normalize_gram(G)
    assert ng.valid.tolist() == [True, False, False]
    assert ng.norms[0] == 5.0 and ng.gram_hat[0, 0] == 1.0
    assert np.all(ng.gram_hat[1:, :] == 0) and np.all(ng.gram_hat[:, 1:] == 0)


def test_flat_grads_uses_the_same_parameter_selection():
    net, losses = _net_and_losses(K=2)
    frozen = torch.nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)
    params = [*net.parameters(), frozen]
    res = gram_from_params(losses, params, keep_grads=True)
    torch.testing.assert_close(flat_grads(losses[1], params), res.grads[1], rtol=0, atol=0)


def test_constant_loss_gives_a_zero_row():
    net, losses = _net_and_losses(K=2)
    res = gram_from_params([losses[0], torch.tensor(0.0, dtype=torch.float64)], list(net.parameters()))
    assert res.gram[1].tolist() == [0.0, 0.0] and res.gram[0, 0].item() > 0
