"""The cheaper Grams of the alignment study (`bench.alignment.ProxyGrams`) against brute force: the
last-layer Gram equals the Gram of autograd's gradients of the output projection's weight and bias,
the last-block Gram that of the last block's trained parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.alignment import ProxyGrams


class Toy(nn.Module):
    """Two trained bias-free blocks (LoRA's shape) and a frozen output projection, named like the SD3
    transformer's."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList([nn.Linear(3, 4, bias=False), nn.Linear(4, 5, bias=False)])
        self.proj_out = nn.Linear(5, 2)
        self.proj_out.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, 3] -> [B, T, 2]
        for block in self.transformer_blocks:
            x = torch.tanh(block(x))
        return self.proj_out(x)


def _losses(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = model(x)  # [B, T, 2]
    w = torch.tensor([[1.0, -2.0], [0.5, 0.3], [-1.0, 1.0]])  # [K, 2]: three "rewards" of the output
    return torch.stack([((y * wk).sum(-1) ** 2).mean() for wk in w])  # [K]


def _brute_gram(params: list[torch.Tensor], losses: torch.Tensor) -> torch.Tensor:
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
        for loss in losses
    ]
    G = torch.stack(rows).to(torch.float64)
    return G @ G.T


def test_proxy_grams_match_brute_force():
    torch.manual_seed(0)
    model = Toy().to(torch.float64)
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    proxies = ProxyGrams(model, [p for p in model.parameters() if p.requires_grad])
    proxies.reset()
    losses = _losses(model, x)
    with torch.no_grad():  # a second forward without a graph (the old / reference policy) is ignored
        model(torch.randn(3, 7, 3, dtype=torch.float64))
    grams = proxies.grams(losses)
    proxies.close()
    model.proj_out.requires_grad_(True)  # brute force: differentiate the projection itself
    losses = _losses(model, x)
    expected_layer = _brute_gram([model.proj_out.weight, model.proj_out.bias], losses)
    expected_block = _brute_gram(list(model.transformer_blocks[1].parameters()), losses)
    torch.testing.assert_close(grams["last_layer"][0], expected_layer, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grams["last_block"][0], expected_block, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(expected_layer, expected_block)  # two different Grams


def test_proxy_grams_need_one_output_projection():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="proj_out"):
        ProxyGrams(model, list(model.parameters()))
