"""Synthetic images of the tiny world: coloured shapes on coloured backgrounds.

Used only to build the tiny model (train its VAE, pretrain its transformer). Images are float
[N, 3, H, W] in [0, 1]. Shapes are drawn as masks on a [-1, 1]^2 coordinate grid, so rendering is a few
vectorised tensor ops per image and fully determined by a `torch.Generator`.
"""

from __future__ import annotations

import re

import torch

from marble.data.tiny_world import (
    PALETTE,
    POSITION_DIRECTIONS,
    SHAPES,
    named_colors,
    named_position,
    quoted_text,
)

_SMALL = {"small", "tiny", "thin"}
_LARGE = {"large", "big", "bold"}
_COLORS = torch.tensor(list(PALETTE.values()), dtype=torch.float32)  # [P, 3]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _grid(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    coords = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 - 1  # [H]
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # [H, W] each; y grows downwards
    return yy, xx


def shape_mask(shape: str, dy: torch.Tensor, dx: torch.Tensor, size: float) -> torch.Tensor:
    """Boolean mask [H, W] of `shape` with half-extent `size`, given offsets from its centre."""
    ay, ax = dy.abs(), dx.abs()
    if shape == "circle":
        return dy**2 + dx**2 < size**2
    if shape == "square":
        return torch.maximum(ay, ax) < size
    if shape == "triangle":  # apex up: width grows linearly from the top edge to the base
        return (dy > -size) & (dy < size) & (ax < (dy + size) / 2)
    if shape == "ring":
        r2 = dy**2 + dx**2
        return (r2 < size**2) & (r2 > (0.6 * size) ** 2)
    if shape == "stripe":
        return (ay < 0.3 * size) & (ax < 1.6 * size)
    if shape == "cross":
        return ((ax < 0.3 * size) & (ay < size)) | ((ay < 0.3 * size) & (ax < size))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _random_color(generator: torch.Generator) -> torch.Tensor:
    """A palette colour with a little jitter (most of the time) or a random RGB colour."""
    if torch.rand((), generator=generator).item() < 0.7:
        idx = int(torch.randint(len(_COLORS), (), generator=generator))
        jitter = (torch.rand(3, generator=generator) - 0.5) * 0.15
        return (_COLORS[idx] + jitter).clamp(0, 1)
    return torch.rand(3, generator=generator)


def _size_for(words: set[str], generator: torch.Generator) -> float:
    if words & _SMALL:
        return _uniform(generator, 0.2, 0.32)
    if words & _LARGE:
        return _uniform(generator, 0.5, 0.7)
    return _uniform(generator, 0.25, 0.6)


def render_prompt(prompt: str | None, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """One image [3, H, W] in [0, 1] that depicts a tiny-world `prompt` (None: a random shape).

    A colour prompt is one large object in the named colour on a dark neutral background, in the
    named half of the image (centred without a position), so that the named colour is what the
    colour reward sees and the object's place is what the position reward sees. Other prompts read
    shape, size, "two" and quoted text; their colours are random. A prompt with quoted text and no
    shape becomes a light sign with dark text-like strokes (edges for the detail reward).
    """
    text = prompt or ""
    words = set(re.findall(r"[a-z]+", text.lower()))
    shapes = [s for s in SHAPES if s in words or f"{s}s" in words]
    if prompt is None:
        shapes = [SHAPES[int(torch.randint(len(SHAPES), (), generator=generator))]]
    yy, xx = _grid(resolution)
    colors = named_colors(text)
    if colors and shapes and quoted_text(text) is None:
        return _render_object(colors[0], shapes[0], named_position(text), yy, xx, generator)
    bg = _random_color(generator)
    fg = _random_color(generator)
    for _ in range(20):  # keep the shape visible
        if torch.dist(fg, bg) >= 0.35:
            break
        fg = _random_color(generator)
    image = bg.view(3, 1, 1).expand(3, resolution, resolution).clone()  # [3, H, W]
    if quoted_text(text) is not None or not shapes:
        _draw_sign(image, yy, xx, generator, top=0.15 if shapes else -0.5)
        if not shapes:
            return image
    count = 2 if "two" in words else 1
    for i in range(count):
        size = _size_for(words, generator) * (0.6 if count == 2 else 1.0)
        cx = _uniform(generator, -0.4, 0.4) if count == 1 else (-0.45 + 0.9 * i)
        cy = _uniform(generator, -0.4, 0.4) if quoted_text(text) is None else -0.45
        mask = shape_mask(shapes[0], yy - cy, xx - cx, size)  # [H, W]
        image[:, mask] = fg.view(3, 1)
    return image


def _render_object(
    color: str,
    shape: str,
    position: str | None,
    yy: torch.Tensor,
    xx: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """A colour prompt's image [3, H, W]: the `shape` in PALETTE[`color`] (slightly jittered) on a dark
    grey background, centred in the `position` half of the image (in the middle when None)."""
    grey = _uniform(generator, 0.0, 0.06)  # far from every palette colour under the colour kernel
    image = torch.full((3, *yy.shape), grey)  # [3, H, W]
    fg = (torch.tensor(PALETTE[color]) + (torch.rand(3, generator=generator) - 0.5) * 0.06).clamp(0, 1)
    if position is None:
        cy, cx = _uniform(generator, -0.1, 0.1), _uniform(generator, -0.1, 0.1)
        size = _uniform(
            generator, 0.5, 0.65
        )  # a square at most 42% of the image: the background stays the median
    else:
        ax, ay = POSITION_DIRECTIONS[position]
        along, across = _uniform(generator, 0.45, 0.55), _uniform(generator, -0.15, 0.15)
        cy, cx = ay * along + ax * across, ax * along + ay * across
        size = _uniform(generator, 0.4, 0.5)
    image[:, shape_mask(shape, yy - cy, xx - cx, size)] = fg.view(3, 1)
    return image


def _draw_sign(
    image: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor, generator: torch.Generator, top: float
) -> None:
    """A light panel with 1-2 lines of dark vertical strokes, in place."""
    panel = (yy > top) & (yy < 0.85) & (xx.abs() < 0.8)  # [H, W]
    image[:, panel] = torch.tensor([0.95, 0.95, 0.92]).view(3, 1)
    period = _uniform(generator, 0.12, 0.2)
    lines = 2 if top < 0 else 1
    height = (0.85 - top) / (lines + 1)
    for j in range(lines):
        y0 = top + height * (j + 0.5)
        strokes = (yy > y0) & (yy < y0 + height * 0.8) & (xx.abs() < 0.65)
        strokes &= torch.remainder(xx + 1, period) < period * 0.45
        image[:, strokes] = torch.tensor([0.08, 0.08, 0.1]).view(3, 1)


def render_batch(prompts: list[str | None], resolution: int, generator: torch.Generator) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1], one per prompt (None: a random shape)."""
    return torch.stack([render_prompt(p, resolution, generator) for p in prompts])
