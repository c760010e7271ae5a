"""The epoch plan and advantage targets (no model): what each rank trains on does not depend on the
process count, NaN rewards never become NaN targets, and layout errors name the field."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from marble.configio import load_config
from marble.data.records import PromptRecord
from marble.errors import TrainingError
from marble.rl.balancers import build_balancer
from marble.train.rollout import EpochBuffer, advantage_targets
from marble.train.stepping import EpochPlan, check_layout

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
CFG = load_config(
    TINY,
    ["sampling.prompts_per_epoch=4", "sampling.group_size=4", "train.micro_batch_size=4",
     "train.gradient_accumulation_steps=2"],
)  # fmt: skip


class _Cache:
    def get(self, prompts):
        return SimpleNamespace(prompts=list(prompts))


def _buffer(rewards: torch.Tensor) -> EpochBuffer:
    G = CFG.sampling.group_size
    prompts = [PromptRecord.create(f"prompt {i}", "general") for i in range(rewards.shape[0] // G)]
    balancer = build_balancer(CFG.balancer, CFG.trained_reward_names)
    r, mask, r_raw, mask_raw, _ = advantage_targets(rewards, G, balancer.objective_advantages, "global", 5.0)
    latents = torch.randn(rewards.shape[0], 16, 8, 8, generator=torch.Generator().manual_seed(0))
    return EpochBuffer(0, prompts, G, latents, rewards, r, mask, r_raw, mask_raw)


def _rewards(n: int, k: int) -> torch.Tensor:
    R = torch.rand(n, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    R[::2, 2] = math.nan  # a specialist that applies to half the samples
    R[3, 0] = math.nan
    return R


def test_nan_rewards_give_finite_targets_and_zero_weight():
    R = _rewards(16, len(CFG.trained_reward_names))
    R[:, 3] = math.nan  # applies to nothing
    buf = _buffer(R)
    assert torch.isfinite(buf.r).all() and torch.isfinite(buf.r_raw).all()
    assert torch.equal(buf.mask, torch.isfinite(R))
    plan = EpochPlan(CFG, buf, 1, 0, torch.linspace(1, 0.1, 8))
    mb = plan.micro_batch(0, 0, _Cache(), torch.device("cpu"))
    assert torch.isfinite(mb.c).all() and (mb.c[:, 3] == 0).all()


def test_two_ranks_see_the_global_micro_batch_of_one():
    buf = _buffer(_rewards(16, len(CFG.trained_reward_names)))
    grid = torch.linspace(1, 0.1, 8)
    one = EpochPlan(CFG, buf, 1, 0, grid)
    for b in range(2):
        for j in (0, 3):
            full = one.micro_batch(b, j, _Cache(), torch.device("cpu"))
            halves = [
                EpochPlan(CFG.model_copy(update={"train": CFG.train.model_copy(update={"micro_batch_size": 2})}),
                          buf, 2, rank, grid).micro_batch(b, j, _Cache(), torch.device("cpu"))
                for rank in (0, 1)
            ]  # fmt: skip
            for field in ("x0", "noise", "t", "r"):
                assert torch.equal(torch.cat([getattr(h, field) for h in halves]), getattr(full, field)), (
                    field
                )
            # weights are normalised over the global micro-batch; x2 because gradients are averaged
            torch.testing.assert_close(torch.cat([h.c for h in halves]) / 2, full.c)
            assert halves[0].emb.prompts + halves[1].emb.prompts == full.emb.prompts


def test_layout_errors_name_the_field():
    with pytest.raises(TrainingError, match="sampling.prompts_per_epoch=4 must be divisible"):
        check_layout(CFG, 3)
    with pytest.raises(TrainingError, match="gradient_accumulation_steps=2"):
        check_layout(CFG, 4)  # 16 samples = 1 global micro-batch of 4 x 4: cannot accumulate 2
    odd = load_config(TINY, ["sampling.prompts_per_epoch=4", "sampling.group_size=3",
                                            "train.micro_batch_size=4", "train.gradient_accumulation_steps=1"])  # fmt: skip
    check_layout(odd, 1)
    with pytest.raises(TrainingError, match="train.micro_batch_size=4 x 2 processes"):
        check_layout(odd, 2)  # 12 samples do not split into micro-batches of 2 x 4
