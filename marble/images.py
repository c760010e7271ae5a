"""Image conversions shared by rewards, evaluation and reports.

Images travel as float tensors `[N, 3, H, W]` in [0, 1] (what `decode_latents` returns); a model or a
file wants 8-bit RGB. Rounding is to nearest in float64, as a PNG export would store the image, so the
pixels a reward scores are the pixels a saved image holds.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> Tensor:
    """`[N, 3, H, W]` float in [0, 1] -> `[N, 3, H, W]` uint8 (clamped, rounded to nearest)."""
    return (images.detach().double().clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8_hwc(images: Tensor) -> np.ndarray:
    """`[N, 3, H, W]` float in [0, 1] -> `[N, H, W, 3]` uint8 numpy (what PIL and OCR engines take)."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: Tensor) -> list[Image.Image]:
    """`[N, 3, H, W]` in [0, 1] -> N RGB PIL images."""
    return [Image.fromarray(a, mode="RGB") for a in to_uint8_hwc(images)]


def to_float(images: Tensor) -> Tensor:
    """`[N, 3, H, W]` uint8 -> float32 in [0, 1]."""
    return images.float() / 255.0
