"""Offline rewards of the tiny world: no weights, deterministic, batch-vectorised.

Mirrors the paper's specialist structure (docs/tiny-world.md):
- general rewards, applying to every prompt: brightness, colorfulness, JPEG compressibility;
- specialists returning NaN elsewhere: colour match (prompts naming a PALETTE colour, GenEval-like),
  position match (prompts naming a POSITIONS word) and edge detail (prompts with quoted text, OCR-like).

The colour and position specialists are zero-sum over their attribute: for ANY image, the scores it gets
under the 8 colour names (or the 4 positions) sum to zero. So an image that ignores its prompt scores 0
on average over a split whose prompts name every colour (position) equally often (what `marble prepare`
makes of the tiny world), and these rewards can rise on such a split only by following the prompt
(docs/tiny-world.md).

Every score function here is pure: images `[N, 3, H, W]` in [0, 1] -> scores `[N]`.
"""

from __future__ import annotations

import io
import math

import torch
from PIL import Image
from torch import Tensor

from marble.data.tiny_world import PALETTE, POSITION_DIRECTIONS, POSITIONS, named_colors, named_position
from marble.images import to_uint8_hwc
from marble.rewards.base import BaseReward

LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights (what PIL's "L" conversion uses)."""

COLOR_SIGMA = 0.3
"""[ours] Width of the RGB-distance kernel of the colour-match reward: wide enough that a pixel half-way
to the named colour still scores (a useful signal for early, muddy samples), narrow enough that other
palette colours score low (the closest palette pair, red/orange, is 0.43 apart -> 0.36)."""

PALETTE_RGB = torch.tensor(list(PALETTE.values()), dtype=torch.float64)  # [P, 3]
POSITION_AXES = torch.tensor([POSITION_DIRECTIONS[p] for p in POSITIONS], dtype=torch.float64)  # [4, 2]
"""(x, y) unit vector of each of POSITIONS, in their order; image y grows downwards."""


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


def content_weights(images: Tensor) -> Tensor:
    """How much each pixel is content rather than background: its RGB distance from the image's median
    colour (the background: an object covers less than half). `[N, 3, H, W]` -> `[N, H, W]`, >= 0."""
    x = images.double()
    background = x.flatten(2).median(dim=2).values[..., None, None]  # [N, 3, 1, 1]
    return ((x - background) ** 2).sum(dim=1).sqrt()


def palette_match(images: Tensor, sigma: float = COLOR_SIGMA) -> Tensor:
    """How much of the image's content lies near each palette colour: the mean over pixels, weighted by
    `content_weights`, of exp(-|p - c|² / (2σ²)).

    images `[N, 3, H, W]` -> `[N, P]` in [0, 1], columns in PALETTE order; 1 means all content is exactly
    that colour, and a flat image (no content) scores 0 everywhere. Weighting by content makes the score
    about the object, not about the background's tint (a dark background drawn slightly green is
    within the kernel of green and would otherwise outweigh a red object a quarter of its size).
    """
    x = images.double()
    w = content_weights(x)  # [N, H, W]
    c = PALETTE_RGB.to(x.device).view(1, -1, 3, 1, 1)  # [1, P, 3, 1, 1]
    k = torch.exp(-((x.unsqueeze(1) - c) ** 2).sum(dim=2) / (2 * sigma**2))  # [N, P, H, W]
    total = w.sum(dim=(1, 2)).clamp_min(1e-12)  # [N]
    return (k * w.unsqueeze(1)).sum(dim=(2, 3)) / total.unsqueeze(1)  # [N, P]


def color_match(images: Tensor, named: Tensor, sigma: float = COLOR_SIGMA) -> Tensor:
    """How much more of the image's content shows the named palette colour(s) than the other palette
    colours: mean of `palette_match` over the named colours minus its mean over the others.

    images `[N, 3, H, W]`, named `[N, P]` bool -> `[N]` in [-1, 1]. With one named colour the scores of an
    image under the P names sum to zero.
    """
    match = palette_match(images, sigma)  # [N, P]
    on = named.to(match.device, torch.bool)
    named_mean = (match * on).sum(dim=1) / on.sum(dim=1).clamp_min(1)  # [N]
    other_mean = (match * ~on).sum(dim=1) / (~on).sum(dim=1).clamp_min(1)  # [N]; 0 if all named
    return named_mean - other_mean


def object_centroid(images: Tensor) -> Tensor:
    """Where the image's content lies: the centroid `[N, 2]` (x, y) in [-1, 1] of the pixels weighted by
    `content_weights`. Pixel centres are at ±(1 - 1/W) at the borders; y grows downwards. A flat image
    has centroid (0, 0)."""
    x = images.double()
    _, _, h, w = x.shape
    weight = content_weights(x)  # [N, H, W]
    ys = (torch.arange(h, dtype=x.dtype, device=x.device) + 0.5) / h * 2 - 1  # [H]
    xs = (torch.arange(w, dtype=x.dtype, device=x.device) + 0.5) / w * 2 - 1  # [W]
    total = weight.sum(dim=(1, 2)).clamp_min(1e-12)  # [N]
    cx = (weight * xs.view(1, 1, w)).sum(dim=(1, 2)) / total
    cy = (weight * ys.view(1, h, 1)).sum(dim=(1, 2)) / total
    return torch.stack([cx, cy], dim=1)  # [N, 2]


def position_match(images: Tensor, positions: Tensor) -> Tensor:
    """How far the image's content lies towards the named side: `object_centroid` projected on the
    direction of POSITIONS[positions] (left = -x, top = -y).

    images `[N, 3, H, W]`, positions `[N]` long indices into POSITIONS -> `[N]` in [-1, 1]; the scores of
    an image under the 4 positions sum to zero.
    """
    axes = POSITION_AXES.to(images.device)[positions.to(images.device)]  # [N, 2]
    return (object_centroid(images) * axes).sum(dim=1)


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
    """Specialist: how much more of the image's content shows the colour(s) the prompt names than the
    other palette colours (`color_match`); NaN for prompts naming none."""

    score_range = (-1.0, 1.0)  # applies to prompts naming a PALETTE colour (rule "named_color")

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        names = list(PALETTE)
        named = torch.zeros(len(prompts), len(names), dtype=torch.bool)  # [n, P]
        for i, prompt in enumerate(prompts):
            named[i, [names.index(c) for c in named_colors(prompt)]] = True
        return color_match(images, named)


class PositionMatchScorer(BaseReward):
    """Specialist: how far the image's content lies towards the side the prompt names (`position_match`);
    NaN for prompts naming no position."""

    score_range = (-1.0, 1.0)  # applies to prompts naming a POSITIONS word (rule "named_position")

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        positions = torch.tensor([POSITIONS.index(named_position(p)) for p in prompts], dtype=torch.long)
        return position_match(images, positions)


class EdgeDetailScorer(BaseReward):
    """Specialist: mean gradient magnitude for prompts with quoted text (OCR-like); NaN otherwise."""

    score_range = (0.0, math.sqrt(2.0))  # applies to prompts with quoted text (rule "quoted_text")

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        return edge_detail(images)
