"""The tiny world's vocabulary and prompt generator (shared by its data, model and rewards).

Three prompt families mixed 1:1:1, mirroring the paper's specialist structure:
- `general`: a shape, no colour word, no quoted text (only the general rewards apply);
- `color`:   names a colour from PALETTE (the colour-match specialist applies, GenEval-like);
- `text`:    carries quoted text (the edge/detail specialist applies, OCR-like).
"""

from __future__ import annotations

import random
import re

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.12, 0.25, 0.90),
    "yellow": (0.95, 0.88, 0.15),
    "cyan": (0.10, 0.85, 0.88),
    "magenta": (0.85, 0.15, 0.80),
    "orange": (0.98, 0.55, 0.08),
    "purple": (0.50, 0.18, 0.70),
}
"""Colour names the colour-match reward understands, as RGB in [0, 1]."""

SHAPES = ("circle", "square", "triangle", "ring", "stripe", "cross")
WORDS = ("open", "stop", "cafe", "sale", "hello", "exit", "marble", "north", "zero", "tiny")
FAMILIES = ("general", "color", "text")

SIZES = ("small", "large", "tiny", "big", "thin", "bold")
_GENERAL = (
    "a {size} {shape}",
    "a photo of a {size} {shape}",
    "a {size} {shape} in the middle",
    "two {size} {shape}s",
)
_COLOR = ("a {color} {shape}", "a {shape} painted {color}", "a {color} background with a {shape}")
_TEXT = ('a sign that says "{word}"', 'a poster with the word "{word}"', 'a {shape} above the text "{word}"')

_QUOTED = re.compile(r'"([^"]+)"')


def named_colors(prompt: str) -> list[str]:
    """Palette colours named in `prompt`, in order of appearance (whole words, lowercase)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    return [w for w in words if w in PALETTE]


def quoted_text(prompt: str) -> str | None:
    """Text between the first pair of double quotes, or None (the OCR convention)."""
    m = _QUOTED.search(prompt)
    return m.group(1) if m else None


def generate_prompts(num_prompts: int, seed: int = 0) -> list[tuple[str, str]]:
    """`num_prompts` unique (prompt, family) pairs, families cycling general/color/text (1:1:1)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    attempts = 0
    while len(out) < num_prompts:
        family = FAMILIES[len(out) % 3]
        template = rng.choice({"general": _GENERAL, "color": _COLOR, "text": _TEXT}[family])
        prompt = template.format(
            shape=rng.choice(SHAPES),
            size=rng.choice(SIZES),
            color=rng.choice(list(PALETTE)),
            word=rng.choice(WORDS),
        )
        attempts += 1
        if prompt in seen:
            if attempts > 100 * num_prompts:
                raise ValueError(f"the tiny world has fewer than {num_prompts} distinct prompts")
            continue
        seen.add(prompt)
        out.append((prompt, family))
    return out
