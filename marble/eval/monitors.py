"""Cheap image statistics that catch reward hacking, compared between base and adapter.

A reward can be gamed without the image getting better: brightness by washing out to white, a
compressibility reward by going flat and dark, colourfulness by saturating everything, an edge or
OCR-like reward by high-frequency noise. None of these monitors is a quality score; the gate only
asks that each stays close to the base model's value (GateConfig.max_monitor_shift).

Every monitor maps images float [N, 3, H, W] in [0, 1] to a per-image value in [0, 1], so one relative
tolerance fits all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

DARK_THRESHOLD = 0.1
"""Luminance below which a pixel counts as dark (on [0, 1])."""
EDGE_THRESHOLD = 0.1
"""Sobel gradient magnitude (kernel / 4: a sharp black-to-white step gives 1) of the luminance above
which a pixel is an edge pixel. 0.25 missed every edge of the blurry 64 px tiny-world images."""
ENTROPY_LEVELS = 8
"""Quantisation levels per channel of the colour histogram (8^3 = 512 bins)."""


def _as_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(images).detach().to("cpu", torch.float64)  # [N, 3, H, W]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"monitors need images [N, 3, H, W], got shape {tuple(x.shape)}")
    return x.clamp(0.0, 1.0)


def luminance(images: torch.Tensor) -> torch.Tensor:
    """Rec. 601 luma of [N, 3, H, W] images -> [N, H, W]."""
    w = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (images * w).sum(dim=1)  # [N, H, W]


def dark_fraction(images: torch.Tensor) -> torch.Tensor:
    """Share of pixels darker than DARK_THRESHOLD: [N]. Catches collapse to black."""
    x = _as_tensor(images)
    return (luminance(x) < DARK_THRESHOLD).double().mean(dim=(1, 2))  # [N]


def edge_density(images: torch.Tensor) -> torch.Tensor:
    """Share of pixels whose Sobel gradient magnitude exceeds EDGE_THRESHOLD: [N].

    Catches high-frequency noise (rises) and flat, featureless images (falls).
    """
    y = luminance(_as_tensor(images)).unsqueeze(1)  # [N, 1, H, W]
    kx = y.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4.0  # [3, 3]
    pad = torch.nn.functional.pad(y, (1, 1, 1, 1), mode="replicate")  # [N, 1, H+2, W+2]
    gx = torch.nn.functional.conv2d(pad, kx.view(1, 1, 3, 3))  # [N, 1, H, W]
    gy = torch.nn.functional.conv2d(pad, kx.t().reshape(1, 1, 3, 3))  # [N, 1, H, W]
    mag = torch.sqrt(gx**2 + gy**2).squeeze(1)  # [N, H, W]
    return (mag > EDGE_THRESHOLD).double().mean(dim=(1, 2))  # [N]


def colour_entropy(images: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the quantised RGB histogram, normalised by its maximum to [0, 1]: [N].

    Catches collapse to a few flat colours (falls) and colour noise (rises).
    """
    x = _as_tensor(images)
    q = (x * (ENTROPY_LEVELS - 1)).round().long()  # [N, 3, H, W] in 0..L-1
    codes = (q[:, 0] * ENTROPY_LEVELS + q[:, 1]) * ENTROPY_LEVELS + q[:, 2]  # [N, H, W]
    bins = ENTROPY_LEVELS**3
    out = torch.empty(x.shape[0], dtype=torch.float64)
    for i, c in enumerate(codes.flatten(1)):
        p = torch.bincount(c, minlength=bins).double() / c.numel()  # [bins]
        p = p[p > 0]
        out[i] = -(p * torch.log2(p)).sum() / np.log2(bins)
    return out  # [N]


def saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation (max - min) / max per image: [N]. Catches over-saturation."""
    x = _as_tensor(images)
    hi = x.amax(dim=1)  # [N, H, W]
    lo = x.amin(dim=1)  # [N, H, W]
    s = torch.where(hi > 1e-8, (hi - lo) / hi.clamp_min(1e-8), torch.zeros_like(hi))  # [N, H, W]
    return s.mean(dim=(1, 2))  # [N]


MONITORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "dark_fraction": dark_fraction,
    "edge_density": edge_density,
    "colour_entropy": colour_entropy,
    "saturation": saturation,
}
"""Every monitor by the name used in metrics (`monitor/<name>`) and the gate."""


def compute_monitors(images: torch.Tensor) -> dict[str, np.ndarray]:
    """All monitors of [N, 3, H, W] images: name -> per-image values [N] (float64)."""
    return {name: fn(images).numpy() for name, fn in MONITORS.items()}


MONITOR_FLOOR = 0.05
"""Denominator floor of the relative shift: a monitor near 0 (no dark pixels) is compared in absolute
terms below this, so 0.00 -> 0.01 is a shift of 0.2, not infinity."""


def relative_shift(base_mean: float, adapter_mean: float) -> float:
    """|adapter - base| / max(|base|, MONITOR_FLOOR): the number the gate bounds."""
    return abs(adapter_mean - base_mean) / max(abs(base_mean), MONITOR_FLOOR)
