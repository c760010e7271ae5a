"""Offline rewards of the tiny world: no weights, deterministic, batch-vectorised.

Mirrors the paper's specialist structure (ARCHITECTURE.md, "The tiny world"):
- general rewards, applying to every prompt: brightness, colorfulness, JPEG compressibility;
- specialists returning NaN elsewhere: colour match (prompts naming a PALETTE colour, GenEval-like) and
  edge detail (prompts with quoted text, OCR-like).

Every score function here is pure: images `[N, 3, H, W]` in [0, 1] -> scores `[N]`.
"""

from __future__ import annotations

import io
import math

import torch
from PIL import Image
from torch import Tensor

from marble.data.tiny_world import PALETTE, named_colors
from marble.images import to_uint8_hwc
from marble.rewards.base import BaseReward

LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights (what PIL's "L" conversion uses)."""

COLOR_SIGMA = 0.3
"""[ours] Width of the RGB-distance kernel of the colour-match reward: wide enough that a pixel half-way
to the named colour still scores (a useful signal for early, muddy samples), narrow enough that other
palette colours score low (the closest palette pair, red/orange, is 0.43 apart -> 0.36)."""


# ------------------------------------------------------------------------------------ pure functions
def luma(images: Tensor) -> Tensor:
    """`[N, 3, H, W]` -> `[N, H, W]` BT.601 luma."""
    w = images.new_tensor(LUMA).view(1, 3, 1, 1)
    return (images * w).sum(dim=1)  # [N, H, W]


def brightness(images: Tensor) -> Tensor:
    """Mean luma per image, in [0, 1]. `[N, 3, H, W]` -> `[N]`."""
    return luma(images.double()).mean(dim=(1, 2))  # [N]


def colorfulness(images: Tensor) -> Tensor:
    """Hasler & Süsstrunk (2003) colourfulness M on [0, 1] RGB: `[N, 3, H, W]` -> `[N]`.

    rg = R - G, yb = (R + G)/2 - B; M = sqrt(σ_rg² + σ_yb²) + 0.3 sqrt(μ_rg² + μ_yb²) with population
    std/mean over pixels. The paper's numbers are on the 0..255 scale: multiply by 255 to compare.
    Range [0, 1.3 * sqrt(2)] (rg, yb in [-1, 1]); a grey image scores 0.
    """
    x = images.double()
    r, g, b = x[:, 0], x[:, 1], x[:, 2]  # [N, H, W]
    rg = (r - g).flatten(1)  # [N, HW]
    yb = (0.5 * (r + g) - b).flatten(1)  # [N, HW]
    std = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))  # [N]
    mean = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)  # [N]
    return std + 0.3 * mean  # [N]


def jpeg_compressibility(images: Tensor, quality: int = 95) -> Tensor:
    """DDPO's compressibility: minus the JPEG size in kB (1000 bytes) at `quality`. `[N]`, <= 0.

    Deterministic for a given Pillow/libjpeg build (no randomness in baseline JPEG encoding).
    """
    sizes = []
    for arr in to_uint8_hwc(images):
        buf = io.BytesIO()
        Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=quality)
        sizes.append(-buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float64)  # [N]


def color_match(images: Tensor, colors: Tensor, sigma: float = COLOR_SIGMA) -> Tensor:
    """Soft fraction of pixels close to a target colour: mean over pixels of exp(-|p - c|² / (2σ²)).

    images `[N, 3, H, W]`, colors `[N, 3]` (one target RGB per image) -> `[N]` in [0, 1]; 1 means every
    pixel is exactly the named colour.
    """
    x = images.double()
    c = colors.to(x).view(-1, 3, 1, 1)
    d2 = ((x - c) ** 2).sum(dim=1)  # [N, H, W]
    return torch.exp(-d2 / (2 * sigma**2)).mean(dim=(1, 2))  # [N]


def edge_detail(images: Tensor) -> Tensor:
    """Mean luma gradient magnitude (forward differences, interior pixels): `[N, 3, H, W]` -> `[N]`.

    A flat image scores 0; a one-pixel checkerboard scores sqrt(2) (the maximum).
    """
    y = luma(images.double())  # [N, H, W]
    dx = y[:, :-1, 1:] - y[:, :-1, :-1]  # [N, H-1, W-1]
    dy = y[:, 1:, :-1] - y[:, :-1, :-1]  # [N, H-1, W-1]
    return torch.sqrt(dx**2 + dy**2).mean(dim=(1, 2))  # [N]


# --------------------------------------------------------------------------------------- rewards
class BrightnessScorer(BaseReward):
    """Mean BT.601 luma; applies to every prompt."""

    score_range = (0.0, 1.0)

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        return brightness(images)


class ColorfulnessScorer(BaseReward):
    """Hasler–Süsstrunk colourfulness on [0, 1] RGB; applies to every prompt."""

    score_range = (0.0, 1.3 * math.sqrt(2.0))

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        return colorfulness(images)


class JpegCompressibilityScorer(BaseReward):
    """Minus JPEG kB at `spec.quality` [DDPO]; applies to every prompt."""

    score_range = (-math.inf, 0.0)

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        return jpeg_compressibility(images, self.spec.quality)


class ColorMatchScorer(BaseReward):
    """Specialist: how much of the image shows the colour(s) the prompt names; NaN without one.

    With several named colours the score is the mean over them (each should be present).
    """

    score_range = (0.0, 1.0)  # applies to prompts naming a PALETTE colour (rule "named_color")

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        out = torch.zeros(images.shape[0], dtype=torch.float64)  # [n]
        for i, prompt in enumerate(prompts):
            names = list(dict.fromkeys(named_colors(prompt)))
            targets = torch.tensor([PALETTE[c] for c in names], dtype=torch.float64)  # [C, 3]
            reps = images[i : i + 1].expand(len(names), -1, -1, -1)  # [C, 3, H, W]
            out[i] = color_match(reps, targets).mean()
        return out


class EdgeDetailScorer(BaseReward):
    """Specialist: mean gradient magnitude for prompts with quoted text (OCR-like); NaN otherwise."""

    score_range = (0.0, math.sqrt(2.0))  # applies to prompts with quoted text (rule "quoted_text")

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        return edge_detail(images)
