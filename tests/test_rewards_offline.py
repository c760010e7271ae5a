"""Offline rewards, the registry and `score_all`, on hand-made images with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from marble.config import (
    BrightnessReward,
    ColorfulnessReward,
    ColorMatchReward,
    EdgeDetailReward,
    JpegCompressibilityReward,
)
from marble.configio import load_config
from marble.data.tiny_world import PALETTE, generate_prompts
from marble.errors import RewardError
from marble.rewards import RewardOutput, build_reward, build_rewards, score_all
from marble.rewards.base import BaseReward, Reward
from marble.rewards.offline import COLOR_SIGMA, colorfulness, edge_detail, jpeg_compressibility


def solid(rgb, n=1, size=16) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def stripes(size=16) -> torch.Tensor:
    """Vertical one-pixel black/white stripes: every horizontal difference is ±1, vertical ones 0."""
    x = torch.zeros(1, 3, size, size)
    x[..., 1::2] = 1.0
    return x


def checkerboard(size=16) -> torch.Tensor:
    ij = torch.arange(size)
    board = ((ij[:, None] + ij[None, :]) % 2).float()
    return board.expand(1, 3, size, size).clone()


def test_brightness_is_bt601_luma():
    r = build_reward(BrightnessReward(name="b"))
    imgs = torch.cat([solid((0, 0, 0)), solid((1, 1, 1)), solid((1, 0, 0)), solid((0.2, 0.4, 0.6))])
    out = r(imgs, ["a"] * 4, [{}] * 4)
    assert isinstance(out, RewardOutput) and out.scores.dtype == torch.float64
    # 0.299 r + 0.587 g + 0.114 b
    expected = [0.0, 1.0, 0.299, 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6]
    assert out.scores.tolist() == pytest.approx(expected, abs=1e-6)


def test_colorfulness_hand_computed():
    grey = solid((0.5, 0.5, 0.5))
    red = solid((1, 0, 0))  # rg = 1, yb = 0.5, no spread: M = 0.3 sqrt(1 + 0.25)
    got = colorfulness(torch.cat([grey, red]))
    assert got[0].item() == pytest.approx(0.0, abs=1e-12)
    assert got[1].item() == pytest.approx(0.3 * math.sqrt(1.25), abs=1e-6)
    # red | green halves: rg = +1 / -1 (std 1, mean 0); yb = 0.5 everywhere (std 0, mean 0.5)
    # -> M = 1 + 0.3 * 0.5
    two = torch.cat([solid((1, 0, 0), size=8), solid((0, 1, 0), size=8)], dim=3)  # [1, 3, 8, 16]
    assert colorfulness(two)[0].item() == pytest.approx(1.15, abs=1e-6)


def test_jpeg_compressibility_prefers_flat_images_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 64, 64, generator=g)
    flat = solid((0.3, 0.6, 0.2), size=64)
    a = jpeg_compressibility(torch.cat([flat, noise]), quality=95)
    assert (a < 0).all() and a[0] > a[1]  # fewer kB is better
    assert torch.equal(a, jpeg_compressibility(torch.cat([flat, noise]), quality=95))
    assert jpeg_compressibility(noise, quality=10)[0] > a[1]  # lower quality, smaller file
    r = build_reward(JpegCompressibilityReward(name="jpeg", quality=95))
    assert r(noise, ["x"], [{}]).scores[0].item() == a[1].item()


def test_color_match_scores_the_named_colour_and_is_nan_elsewhere():
    r = build_reward(ColorMatchReward(name="cm"))
    red = solid(PALETTE["red"], n=3)
    out = r(red, ["a red circle", "a blue circle", "a large circle"], [{}] * 3).scores
    assert out[0].item() == pytest.approx(1.0)
    d2 = sum((a - b) ** 2 for a, b in zip(PALETTE["red"], PALETTE["blue"], strict=True))
    assert out[1].item() == pytest.approx(math.exp(-d2 / (2 * COLOR_SIGMA**2)), rel=1e-5)
    assert math.isnan(out[2].item())
    # half the pixels red, half black: black is far from red, so about half the score
    img = torch.cat([solid(PALETTE["red"], size=8), solid((0, 0, 0), size=8)], dim=3)
    half = r(img, ["a red square"], [{}]).scores[0].item()
    d2_black = sum(c**2 for c in PALETTE["red"])
    assert half == pytest.approx(0.5 + 0.5 * math.exp(-d2_black / (2 * COLOR_SIGMA**2)), rel=1e-5)
    assert r.applies_to("a cyan ring", {}) and not r.applies_to("a redundant ring", {})


def test_edge_detail_hand_computed_and_specialist():
    assert edge_detail(solid((0.4, 0.4, 0.4)))[0].item() == 0.0
    assert edge_detail(stripes())[0].item() == pytest.approx(1.0, abs=1e-6)
    assert edge_detail(checkerboard())[0].item() == pytest.approx(math.sqrt(2.0), abs=1e-6)
    r = build_reward(EdgeDetailReward(name="edge"))
    out = r(torch.cat([stripes(), stripes()]), ['a sign that says "open"', "a small ring"], [{}, {}]).scores
    assert out[0].item() == pytest.approx(1.0, abs=1e-6) and math.isnan(out[1].item())


def test_batching_over_applicable_images_matches_one_batch():
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(7, 3, 16, 16, generator=g)
    prompts = [p for p, _ in generate_prompts(7, seed=3)]
    for spec_cls in (ColorMatchReward, EdgeDetailReward, ColorfulnessReward):
        one = build_reward(spec_cls(name="x", batch_size=64))(imgs, prompts, [{}] * 7).scores
        many = build_reward(spec_cls(name="x", batch_size=2))(imgs, prompts, [{}] * 7).scores
        assert torch.equal(one.isnan(), many.isnan())
        torch.testing.assert_close(one.nan_to_num(-1), many.nan_to_num(-1))


def test_score_all_on_tiny_config_columns_and_nan_pattern():
    cfg = load_config("configs/tiny.yaml")
    rewards = build_rewards(cfg.rewards)
    assert all(isinstance(r, Reward) for r in rewards)
    pairs = generate_prompts(12, seed=0)
    prompts = [p for p, _ in pairs]
    imgs = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    R = score_all(rewards, imgs, prompts, [{}] * 12)
    assert R.shape == (12, len(cfg.rewards)) and R.dtype == torch.float64
    names = [r.name for r in rewards]
    fam = [f for _, f in pairs]
    for j, name in enumerate(names):
        col = R[:, j]
        if name == "color_match":
            assert torch.equal(col.isnan(), torch.tensor([f != "color" for f in fam]))
        elif name == "edge_detail":
            assert torch.equal(col.isnan(), torch.tensor([f != "text" for f in fam]))
        else:
            assert torch.isfinite(col).all(), name


class _Broken(BaseReward):
    """Returns inf for the first image and NaN (unexpected: it applies) for the second."""

    def _score(self, images, prompts, metadata):
        out = torch.ones(images.shape[0], dtype=torch.float64)
        out[0], out[1] = math.inf, math.nan
        return out


def test_score_all_counts_unexpected_non_finite_scores(caplog):
    broken = _Broken(BrightnessReward(name="broken"))
    ok = build_reward(BrightnessReward(name="ok"))
    counts: dict[str, int] = {}
    R = score_all([ok, broken], torch.rand(3, 3, 8, 8), ["a", "b", "c"], None, nonfinite_counts=counts)
    assert counts == {"broken": 2}
    assert R[:, 1].isnan().tolist() == [True, True, False] and torch.isfinite(R[:, 0]).all()
    assert "broken" in caplog.text
    score_all([ok, broken], torch.rand(3, 3, 8, 8), ["a", "b", "c"], None, nonfinite_counts=counts)
    assert counts == {"broken": 4}


def test_bad_inputs_and_unknown_kind_are_refused():
    r = build_reward(BrightnessReward(name="b"))
    with pytest.raises(RewardError, match="'b'.*\\[N, 3, H, W\\]"):
        r(torch.rand(3, 8, 8), ["a"], [{}])
    with pytest.raises(RewardError, match="2 images but 1 prompts"):
        r(torch.rand(2, 3, 8, 8), ["a"], [{}, {}])
    with pytest.raises(RewardError, match="float"):
        r(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["a"], [{}])

    class Spec:
        kind, name = "nope", "n"

    with pytest.raises(RewardError, match="'nope'"):
        build_reward(Spec())
    with pytest.raises(RewardError, match="unique"):
        build_rewards([BrightnessReward(name="b"), BrightnessReward(name="b")])


def test_applicability_is_the_projects_single_rule():
    from marble.data.applicability import reward_applies

    cases = [('a sign that says "open"', {}), ('blank "  " quotes', {}), ("a red ring", {}), ("a ring", {})]
    cfg = load_config("configs/tiny.yaml")
    for reward in build_rewards(cfg.rewards):
        for prompt, meta in cases:
            assert reward.applies_to(prompt, meta) == reward_applies(reward.spec.kind, prompt, meta)
    edge = build_reward(EdgeDetailReward(name="edge"))
    assert math.isnan(edge(stripes(), ['blank "  " quotes'], [{}]).scores[0].item())  # nothing to read
