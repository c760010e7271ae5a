"""Real reward weights (slow; needs a reward cache or hub access): run where the weights are available.

    MARBLE_REWARD_CACHE=/mnt/marble-cache/rewards pytest -m slow tests/test_rewards_real.py

Checks the paper's rewards load through the cache and pass the golden-image health check, and that a
prompt that matches its image scores higher than one that does not (a sanity check real weights pass
and random or broken weights usually fail).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from marble.configio import load_config
from marble.hub import Hub
from marble.rewards import build_rewards, score_all
from marble.rewards.check import check_rewards, golden_batch

CACHE = os.environ.get("MARBLE_REWARD_CACHE")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CACHE, reason="set MARBLE_REWARD_CACHE to a `marble cache-rewards` directory"),
]


def test_paper_rewards_pass_the_health_check():
    cfg = load_config("configs/sd35m-marble.yaml")
    report = check_rewards(cfg, Hub(cache_dir=Path(CACHE)))
    assert all(r.name in report for r in cfg.rewards)


def test_matching_prompts_score_higher():
    cfg = load_config("configs/sd35m-marble.yaml")
    specs = [s for s in cfg.rewards if s.kind in ("pickscore", "clipscore", "hpsv21", "imagereward")]
    rewards = build_rewards(specs)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for r in rewards:
        r.setup(device, Hub(cache_dir=Path(CACHE)))
    images, prompts, meta = golden_batch(size=256)
    shuffled = prompts[1:] + prompts[:1]  # every image paired with another image's prompt
    matched = score_all(rewards, images, prompts, meta)
    mismatched = score_all(rewards, images, shuffled, meta)
    for k, r in enumerate(rewards):
        assert matched[:, k].mean() > mismatched[:, k].mean(), r.name
