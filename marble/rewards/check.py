"""`marble rewards check`: score deterministic golden images and refuse broken rewards loudly.

A reward that is constant, all NaN, non-finite or outside its documented range on clearly different
images is broken (the classic silent failure: a reward that returns zeros after a bad install), and
training on it would waste a run. The golden set is drawn with PIL, no files: coloured shapes, flat and
noisy backgrounds, stripes and rendered words, each with a prompt (general, colour-naming or quoted
text) and, for a few, GenEval metadata, so every builtin reward has images it applies to.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from marble.config import MarbleConfig
from marble.data.tiny_world import PALETTE
from marble.errors import RewardError
from marble.hub import Hub
from marble.rewards.base import Reward
from marble.rewards.registry import build_rewards

log = logging.getLogger(__name__)

GOLDEN_SIZE = 128


@dataclass(frozen=True)
class Golden:
    prompt: str
    metadata: dict
    draw: tuple  # (background RGB 0..255, list of (shape, colour, box or text))


def _rgb(name: str) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in PALETTE[name])  # type: ignore[return-value]


def _geneval(tag: str, *include: dict) -> dict:
    return {"tag": tag, "include": list(include)}


WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (128, 128, 128)
GOLDENS: tuple[Golden, ...] = (
    Golden("a red circle", _geneval("single_object", {"class": "circle", "count": 1}),
           (WHITE, [("ellipse", _rgb("red"), (24, 24, 104, 104))])),
    Golden("a blue square", _geneval("colors", {"class": "square", "count": 1, "color": "blue"}),
           (BLACK, [("rect", _rgb("blue"), (28, 28, 100, 100))])),
    Golden("a green triangle", {}, (GREY, [("triangle", _rgb("green"), (20, 108, 64, 20, 108, 108))])),
    Golden("a yellow background with a ring", {}, (_rgb("yellow"), [("ring", BLACK, (30, 30, 98, 98))])),
    Golden('a sign that says "open"', {}, (WHITE, [("text", BLACK, "OPEN")])),
    Golden('a poster with the word "stop"', {}, (_rgb("red"), [("text", WHITE, "STOP")])),
    Golden('a sign that says "cafe"', {}, ((40, 40, 40), [("stripes", (200, 200, 200), 8), ("text", WHITE, "CAFE")])),
    Golden("a large cross", {}, (GREY, [("rect", WHITE, (54, 10, 74, 118)), ("rect", WHITE, (10, 54, 118, 74))])),
    Golden("a photo of a small circle", _geneval("single_object", {"class": "circle", "count": 1}),
           ("noise", [("ellipse", _rgb("magenta"), (44, 44, 84, 84))])),
    Golden("two thin stripes", _geneval("counting", {"class": "stripe", "count": 2}),
           ((230, 230, 230), [("rect", BLACK, (36, 0, 44, 128)), ("rect", BLACK, (84, 0, 92, 128))])),
    Golden("a purple square", {}, (WHITE, [("rect", _rgb("purple"), (16, 16, 112, 112))])),
    Golden("a small circle in the middle", {}, (GREY, [])),
    Golden("a green circle on the left", {}, (BLACK, [("ellipse", _rgb("green"), (8, 40, 56, 88))])),
    Golden("an orange square at the bottom", {}, ((20, 20, 20), [("rect", _rgb("orange"), (44, 76, 84, 116))])),
)  # fmt: skip
"""The golden set: prompt, GenEval metadata (or {}), and how to draw the image."""


def _draw(spec: tuple, size: int, rng: np.random.Generator) -> Image.Image:
    background, items = spec
    if background == "noise":
        img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), mode="RGB")
    else:
        img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    s = size / GOLDEN_SIZE
    for shape, colour, arg in items:
        if shape == "ellipse":
            d.ellipse([v * s for v in arg], fill=colour)
        elif shape == "rect":
            d.rectangle([v * s for v in arg], fill=colour)
        elif shape == "triangle":
            d.polygon([v * s for v in arg], fill=colour)
        elif shape == "ring":
            d.ellipse([v * s for v in arg], outline=colour, width=max(1, int(10 * s)))
        elif shape == "stripes":
            for x in range(0, size, 2 * arg):
                d.rectangle([x, 0, x + arg - 1, size], fill=colour)
        elif shape == "text":
            font = ImageFont.load_default(size=max(8, int(36 * s)))
            box = d.textbbox((0, 0), arg, font=font)
            pos = ((size - (box[2] - box[0])) / 2 - box[0], (size - (box[3] - box[1])) / 2 - box[1])
            d.text(pos, arg, fill=colour, font=font)
    return img


def golden_batch(size: int = GOLDEN_SIZE, seed: int = 0) -> tuple[Tensor, list[str], list[dict]]:
    """The golden images `[G, 3, size, size]` in [0, 1], their prompts and metadata (deterministic)."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(_draw(g.draw, size, rng), dtype=np.float32) / 255.0 for g in GOLDENS]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # [G, 3, H, W]
    return images, [g.prompt for g in GOLDENS], [dict(g.metadata) for g in GOLDENS]


@dataclass
class RewardHealth:
    name: str
    kind: str
    applicable: int
    low: float
    mean: float
    high: float
    std: float
    seconds: float
    problems: list[str]

    def row(self) -> str:
        status = "OK" if not self.problems else "FAIL: " + "; ".join(self.problems)
        return (
            f"{self.name:<16} {self.kind:<22} {self.applicable:>3} {self.low:>10.4g} {self.mean:>10.4g} "
            f"{self.high:>10.4g} {self.std:>10.3g} {self.seconds:>7.2f}  {status}"
        )


def diagnose(reward: Reward, images: Tensor, prompts: list[str], metadata: list[dict]) -> RewardHealth:
    """Score the golden batch with one reward and list what is wrong with the scores."""
    t0 = time.perf_counter()
    scores = reward(images, prompts, metadata).scores.double()  # [G]
    seconds = time.perf_counter() - t0
    applies = torch.tensor([reward.applies_to(p, m) for p, m in zip(prompts, metadata, strict=True)])
    valid = scores[applies]
    finite = valid[torch.isfinite(valid)]
    problems = []
    if not applies.any():
        problems.append("applies to no golden prompt (cannot be checked)")
    elif finite.numel() == 0:
        problems.append(f"all NaN on {int(applies.sum())} applicable images")
    else:
        if finite.numel() < valid.numel():
            problems.append(f"{valid.numel() - finite.numel()} non-finite score(s) where it applies")
        lo, hi = getattr(reward, "score_range", (-math.inf, math.inf))
        if finite.min() < lo - 1e-9 or finite.max() > hi + 1e-9:
            problems.append(
                f"scores [{finite.min():.4g}, {finite.max():.4g}] outside the documented range [{lo}, {hi}]"
            )
        if finite.numel() > 1 and (finite.max() - finite.min()) <= 1e-9 * max(1.0, float(finite.abs().max())):
            problems.append(f"constant ({finite[0]:.6g}) on {finite.numel()} different images")
    if (~torch.isnan(scores[~applies])).any():
        problems.append("a score where the reward says it does not apply (must be NaN)")
    if finite.numel():
        low, mean, high = float(finite.min()), float(finite.mean()), float(finite.max())
        std = float(finite.std()) if finite.numel() > 1 else 0.0
    else:
        low = mean = high = std = math.nan
    kind = getattr(getattr(reward, "spec", None), "kind", type(reward).__name__)
    return RewardHealth(reward.name, kind, int(applies.sum()), low, mean, high, std, seconds, problems)


def check_rewards(
    cfg: MarbleConfig,
    hub: Hub | None = None,
    *,
    rewards: Sequence[Reward] | None = None,
    device: str | None = None,
) -> str:
    """Health-check every reward of `cfg` (or the given `rewards`) on the golden set, loading weights
    through `hub` (the run's reward cache, offline switch and model lock; default: as the config says).

    Returns a plain-text report; raises `RewardError` (with the report) if any reward is broken.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if rewards is None:
        hub = hub or Hub.create(offline=cfg.model.offline)
        rewards = build_rewards(cfg.rewards)
        for r in rewards:
            r.setup(device, hub)
    images, prompts, metadata = golden_batch()
    header = f"{'reward':<16} {'kind':<22} {'n':>3} {'min':>10} {'mean':>10} {'max':>10} {'std':>10} {'sec':>7}  status"
    results = [diagnose(r, images, prompts, metadata) for r in rewards]
    report = "\n".join(
        [f"reward health check on {len(prompts)} golden images", header, *(h.row() for h in results)]
    )
    failed = [h.name for h in results if h.problems]
    if failed:
        raise RewardError(f"reward health check failed for {failed}:\n{report}")
    log.debug("%s", report)
    return report
