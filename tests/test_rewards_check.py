"""`marble rewards check`: the tiny world's rewards pass; constant, all-NaN and out-of-range ones are refused."""

from __future__ import annotations

import math

import pytest
import torch

from marble.cli import main
from marble.config import PixelReward
from marble.configio import load_config
from marble.errors import RewardError
from marble.rewards import build_reward
from marble.rewards.base import BaseReward
from marble.rewards.check import GOLDENS, check_rewards, golden_batch


def test_golden_batch_is_deterministic_and_varied():
    a, prompts, metadata = golden_batch()
    b, _, _ = golden_batch()
    assert a.shape == (len(GOLDENS), 3, 128, 128) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    flat = a.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(len(GOLDENS))).min() > 0  # no two images alike
    assert any('"' in p for p in prompts) and any(m.get("include") for m in metadata)


def test_tiny_config_rewards_pass(capsys):
    assert main(["rewards", "check", "--config", "configs/tiny.yaml"]) == 0
    out = capsys.readouterr().out
    for name in ("brightness", "colorfulness", "color_match", "edge_detail", "jpeg"):
        assert any(line.startswith(name) and line.rstrip().endswith("OK") for line in out.splitlines()), name


class _Constant(BaseReward):
    """The classic silent failure: a reward that returns 0 for everything after a broken install."""

    def _score(self, images, prompts, metadata):
        return torch.zeros(images.shape[0], dtype=torch.float64)


class _AllNan(BaseReward):
    def _score(self, images, prompts, metadata):
        return torch.full((images.shape[0],), math.nan, dtype=torch.float64)


class _OutOfRange(BaseReward):
    score_range = (0.0, 1.0)

    def _score(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3)).double() * 10  # documented [0, 1], returns up to 10


@pytest.mark.parametrize(
    ("cls", "message"),
    [(_Constant, "constant"), (_AllNan, "all NaN"), (_OutOfRange, "outside the documented range")],
)
def test_broken_rewards_are_refused_with_a_report(cls, message):
    cfg = load_config("configs/tiny.yaml")
    good = build_reward(PixelReward(kind="brightness", name="brightness"))
    broken = cls(PixelReward(kind="color_match", name="broken"))  # a specialist: only colour prompts count
    with pytest.raises(RewardError, match=rf"\['broken'\][\s\S]*{message}") as err:
        check_rewards(cfg, rewards=[good, broken])
    assert "brightness" in str(err.value)  # the report lists the healthy rewards too


def test_cli_refuses_a_constant_reward_with_exit_2(monkeypatch, capsys):
    import marble.rewards.check as check

    real = check.build_rewards
    monkeypatch.setattr(
        check,
        "build_rewards",
        lambda specs: [
            _Constant(s) if s.name == "jpeg" else r for s, r in zip(specs, real(specs), strict=True)
        ],
    )
    assert main(["rewards", "check", "--config", "configs/tiny.yaml"]) == 2
    err = capsys.readouterr().err
    assert "jpeg" in err and "constant" in err
