"""Gradient accumulation is invisible: one micro-batch of 2N samples and two accumulated micro-batches
of N give the same gradient, through the trainer's own optimizer step (accelerate's accumulation, its
loss scaling, the gradient sync and clip).

Exact equality needs every per-reward loss to be the same mean either way: each reward's loss is the
mean over the micro-batch's samples it applies to (docs/algorithm.md §3), so the rewards here apply to
every prompt (brightness, colorfulness) and the balancer is `equal` (fixed weights; a Gram-based
balancer would see a different Gram on half the samples, by design).
"""

from __future__ import annotations

import pytest
import torch
from _train_helpers import first_step_gradient, train_config

from marble.configio import validate_config
from marble.data.prepare import prepare_prompts

pytestmark = pytest.mark.tiny_model  # loads the built tiny model (tests/conftest.py)

N = 6  # 3 prompts x 4 images = 12 = 2N samples per epoch
REWARDS = [
    {"kind": "brightness", "name": "brightness"},
    {"kind": "colorfulness", "name": "colorfulness"},
]


def _config(tiny_config, micro_batch_size: int, accumulation: int):
    cfg = train_config(
        tiny_config,
        rewards=REWARDS,
        train={
            "micro_batch_size": micro_batch_size,
            "gradient_accumulation_steps": accumulation,
            "max_grad_norm": 1e9,  # no clipping: compare the raw accumulated gradients
            "diagnostics_every": 0,
        },
    )
    return validate_config({**cfg.model_dump(mode="json"), "balancer": {"kind": "equal"}}, "test")


def test_one_micro_batch_of_2n_equals_two_accumulated_micro_batches_of_n(tiny_config, tmp_path):
    whole_cfg = _config(tiny_config, micro_batch_size=2 * N, accumulation=1)
    split_cfg = _config(tiny_config, micro_batch_size=N, accumulation=2)
    prompts = tmp_path / "prompts"
    prepare_prompts(whole_cfg, prompts)
    whole, latents_a, metrics_a = first_step_gradient(whole_cfg, prompts, tmp_path / "whole")
    split, latents_b, metrics_b = first_step_gradient(split_cfg, prompts, tmp_path / "split")

    assert torch.equal(latents_a, latents_b), "both runs must train on the same rollouts"
    assert whole.keys() == split.keys() and whole
    flat_a = torch.cat([whole[k].flatten() for k in sorted(whole)])  # [P]
    flat_b = torch.cat([split[k].flatten() for k in sorted(split)])  # [P]
    assert flat_a.norm() > 0
    # float32 sums in another order: equal to a relative 1e-4 of the gradient's size
    torch.testing.assert_close(flat_b, flat_a, rtol=0, atol=1e-4 * float(flat_a.abs().max()))
    assert metrics_b["train/grad_norm"] == pytest.approx(metrics_a["train/grad_norm"], rel=1e-4)
    assert metrics_b["loss/policy"] == pytest.approx(metrics_a["loss/policy"], rel=1e-4, abs=1e-7)
