"""Offline rewards, the registry and `score_all`, on hand-made images with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from marble.config import JpegCompressibilityReward, PixelReward
from marble.configio import load_config
from marble.data.tiny_world import PALETTE, POSITIONS, generate_prompts
from marble.errors import RewardError
from marble.rewards import RewardOutput, build_reward, build_rewards, score_all
from marble.rewards.base import BaseReward, Reward
from marble.rewards.offline import (
    COLOR_SIGMA,
    color_match,
    colorfulness,
    edge_detail,
    jpeg_compressibility,
    object_centroid,
    palette_match,
    position_match,
)


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
    r = build_reward(PixelReward(kind="brightness", name="b"))
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


def _kernel(a, b) -> float:
    return math.exp(-sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / (2 * COLOR_SIGMA**2))


def on_black(rgb, n=1, size=16, side=6) -> torch.Tensor:
    """A black image with a `side` x `side` square of `rgb` in a corner: the square is all the content."""
    img = torch.zeros(n, 3, size, size)
    img[:, :, :side, :side] = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1)
    return img


def test_color_match_is_named_minus_other_palette_colours_and_nan_elsewhere():
    r = build_reward(PixelReward(kind="color_match", name="cm"))
    red = on_black(PALETTE["red"], n=3)
    out = r(red, ["a red circle", "a blue circle", "a large circle"], [{}] * 3).scores
    others = [c for c in PALETTE if c != "red"]
    # a red object: 1 for red, k(red, c) for every other palette colour c (the background weighs 0)
    assert out[0].item() == pytest.approx(1 - sum(_kernel(PALETTE["red"], PALETTE[c]) for c in others) / 7)
    not_blue = [c for c in PALETTE if c != "blue"]
    expected_blue = (
        _kernel(PALETTE["red"], PALETTE["blue"])
        - sum(_kernel(PALETTE["red"], PALETTE[c]) for c in not_blue) / 7
    )
    assert out[1].item() == pytest.approx(expected_blue, rel=1e-6)
    assert math.isnan(out[2].item())
    # an image's scores under the 8 colour names sum to zero (a prompt-blind change averages to 0)
    names = [f"a {c} circle" for c in PALETTE]
    assert sum(r(red[:1].expand(8, -1, -1, -1), names, [{}] * 8).scores.tolist()) == pytest.approx(
        0, abs=1e-12
    )
    # a flat image has no content: 0 under every name, however close its tint is to the named colour
    assert r(solid(PALETTE["red"]), ["a red square"], [{}]).scores[0].item() == 0.0
    assert r.applies_to("a cyan ring", {}) and not r.applies_to("a redundant ring", {})


def test_palette_match_and_color_match_hand_computed():
    # content = the green square; its pixels weigh |green - black|, the black background 0
    img = on_black(PALETTE["green"])
    expected = [_kernel(PALETTE["green"], rgb) for rgb in PALETTE.values()]
    assert palette_match(img)[0].tolist() == pytest.approx(expected, rel=1e-6)
    named = torch.zeros(1, len(PALETTE), dtype=torch.bool)
    named[0, [0, 2]] = True  # red and blue named: their mean minus the other six's mean
    want = (expected[0] + expected[2]) / 2 - sum(e for k, e in enumerate(expected) if k not in (0, 2)) / 6
    assert color_match(img, named)[0].item() == pytest.approx(want, rel=1e-6)


def _dot(size: int, row: int, col: int) -> torch.Tensor:
    """A black `size` x `size` image with one white pixel."""
    img = torch.zeros(1, 3, size, size)
    img[..., row, col] = 1.0
    return img


def test_position_match_hand_computed_and_nan_elsewhere():
    # 4 x 4, white pixel at row 1, column 0: background (median) black, so the centroid is the pixel's
    # centre x = (0 + 0.5) / 4 * 2 - 1 = -0.75, y = (1 + 0.5) / 4 * 2 - 1 = -0.25
    img = _dot(4, 1, 0)
    assert object_centroid(img)[0].tolist() == pytest.approx([-0.75, -0.25])
    r = build_reward(PixelReward(kind="position_match", name="pos"))
    prompts = ["a red circle on the left", "a red circle on the right", "a red circle at the top",
               "a red circle at the bottom", "a red circle"]  # fmt: skip
    out = r(img.expand(5, -1, -1, -1), prompts, [{}] * 5).scores
    assert out[:4].tolist() == pytest.approx([0.75, -0.75, 0.25, -0.25])
    assert math.isnan(out[4].item())
    assert position_match(solid((0.3, 0.3, 0.3)), torch.tensor([0]))[0].item() == 0.0  # flat: no content
    # two pixels, weights 1 (grey 0.5 step on all channels: sqrt(0.75)) and sqrt(3): a weighted centroid
    two = _dot(4, 0, 3)
    two[..., 3, 3] = 0.5
    w1, w2 = math.sqrt(3.0), math.sqrt(0.75)
    assert object_centroid(two)[0].tolist() == pytest.approx([0.75, (w1 * -0.75 + w2 * 0.75) / (w1 + w2)])


def test_colour_and_position_rewards_are_zero_sum_over_their_attribute():
    """Any image's scores under the 8 colour names (4 positions) sum to zero, so a change that ignores the
    prompt cannot raise their mean over prompts that name every colour (position) equally often."""
    imgs = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cm = build_reward(PixelReward(kind="color_match", name="cm"))
    pm = build_reward(PixelReward(kind="position_match", name="pos"))
    colour_total = sum(cm(imgs, [f"a {c} ring"] * 5, [{}] * 5).scores for c in PALETTE)
    position_total = sum(pm(imgs, [f"a red ring on the {p}"] * 5, [{}] * 5).scores for p in POSITIONS)
    assert colour_total.abs().max().item() < 1e-12 and position_total.abs().max().item() < 1e-12


def test_edge_detail_hand_computed_and_specialist():
    assert edge_detail(solid((0.4, 0.4, 0.4)))[0].item() == 0.0
    assert edge_detail(stripes())[0].item() == pytest.approx(1.0, abs=1e-6)
    assert edge_detail(checkerboard())[0].item() == pytest.approx(math.sqrt(2.0), abs=1e-6)
    r = build_reward(PixelReward(kind="edge_detail", name="edge"))
    out = r(torch.cat([stripes(), stripes()]), ['a sign that says "open"', "a small ring"], [{}, {}]).scores
    assert out[0].item() == pytest.approx(1.0, abs=1e-6) and math.isnan(out[1].item())


def test_batching_over_applicable_images_matches_one_batch():
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(12, 3, 16, 16, generator=g)
    prompts = [p for p, _ in generate_prompts(12, seed=3)]
    for kind in ("color_match", "position_match", "edge_detail", "colorfulness"):
        one = build_reward(PixelReward(kind=kind, name="x", batch_size=64))(imgs, prompts, [{}] * 12).scores
        many = build_reward(PixelReward(kind=kind, name="x", batch_size=2))(imgs, prompts, [{}] * 12).scores
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
        elif name == "position_match":
            positional = [" on the " in p or " at the " in p for p in prompts]
            assert torch.equal(col.isnan(), torch.tensor([not x for x in positional])) and any(positional)
        else:
            assert torch.isfinite(col).all(), name


class _Broken(BaseReward):
    """Returns inf for the first image and NaN (unexpected: it applies) for the second."""

    def _score(self, images, prompts, metadata):
        out = torch.ones(images.shape[0], dtype=torch.float64)
        out[0], out[1] = math.inf, math.nan
        return out


def test_score_all_counts_unexpected_non_finite_scores(caplog):
    broken = _Broken(PixelReward(kind="brightness", name="broken"))
    ok = build_reward(PixelReward(kind="brightness", name="ok"))
    counts: dict[str, int] = {}
    R = score_all([ok, broken], torch.rand(3, 3, 8, 8), ["a", "b", "c"], None, nonfinite_counts=counts)
    assert counts == {"broken": 2}
    assert R[:, 1].isnan().tolist() == [True, True, False] and torch.isfinite(R[:, 0]).all()
    assert "broken" in caplog.text
    score_all([ok, broken], torch.rand(3, 3, 8, 8), ["a", "b", "c"], None, nonfinite_counts=counts)
    assert counts == {"broken": 4}


def test_bad_inputs_and_unknown_kind_are_refused():
    r = build_reward(PixelReward(kind="brightness", name="b"))
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
        build_rewards([PixelReward(kind="brightness", name="b"), PixelReward(kind="brightness", name="b")])


def test_applicability_is_the_projects_single_rule():
    from marble.data.applicability import reward_applies

    cases = [('a sign that says "open"', {}), ('blank "  " quotes', {}), ("a red ring", {}), ("a ring", {})]
    cfg = load_config("configs/tiny.yaml")
    for reward in build_rewards(cfg.rewards):
        for prompt, meta in cases:
            assert reward.applies_to(prompt, meta) == reward_applies(reward.spec.kind, prompt, meta)
    edge = build_reward(PixelReward(kind="edge_detail", name="edge"))
    assert math.isnan(edge(stripes(), ['blank "  " quotes'], [{}]).scores[0].item())  # nothing to read
