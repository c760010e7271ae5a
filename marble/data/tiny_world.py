"""The tiny world's vocabulary, grammar and prompt generator (shared by its data, model and rewards).

Three prompt families mixed 1:1:1, mirroring the paper's specialist structure:
- `general`: a shape, no colour word, no quoted text (only the general rewards apply);
- `color`:   one object in a PALETTE colour (the colour-match specialist applies, GenEval-like); every
             other colour prompt also places it "on the left" / "on the right" / "at the top" / "at the
             bottom" (the position specialist applies to those);
- `text`:    carries quoted text (the edge/detail specialist applies, OCR-like).

The generator balances the attributes the specialists score: colour prompts take the palette colours in
turn (a fresh seeded order every 8 prompts) and the positional ones the positions in turn, so any prefix
of the prompt list names every colour and every position about equally often. The colour x shape pairs
in HELD_OUT_COMBOS are never rendered when the tiny model is pretrained: measuring conditioning on them
tests the model on combinations it has not seen (docs/tiny-world.md).
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
POSITIONS = ("left", "right", "top", "bottom")
"""Where a positional colour prompt places its object; y grows downwards in images, so "top" is -y."""
POSITION_DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "top": (0.0, -1.0),
    "bottom": (0.0, 1.0),
}
"""(x, y) unit vector of each of POSITIONS in image coordinates (the renderer and the position reward)."""
WORDS = ("open", "stop", "cafe", "sale", "hello", "exit", "marble", "north", "zero", "tiny")
FAMILIES = ("general", "color", "text")
SIZES = ("small", "large", "tiny", "big", "thin", "bold")

HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (color, SHAPES[i % len(SHAPES)]) for i, color in enumerate(PALETTE)
)
"""Colour x shape pairs never rendered in pretraining: one per colour, every shape at least once."""

_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
_GENERAL = (
    "a {size} {shape}",
    "a photo of a {size} {shape}",
    "a {size} {shape} in the middle",
    "two {size} {shape}s",
)
_COLOR = ("a {color} {shape}", "a {shape} painted {color}")
_TEXT = ('a sign that says "{word}"', 'a poster with the word "{word}"', 'a {shape} above the text "{word}"')

_QUOTED = re.compile(r'"([^"]+)"')
_AN = re.compile(r"\ba (?=[aeiou])")  # "an orange circle"


def _words(prompt: str) -> list[str]:
    return re.findall(r"[a-z]+", prompt.lower())


def named_colors(prompt: str) -> list[str]:
    """Palette colours named in `prompt`, in order of appearance (whole words, lowercase)."""
    return [w for w in _words(prompt) if w in PALETTE]


def named_position(prompt: str) -> str | None:
    """The first POSITIONS word of `prompt` (whole word, lowercase), or None."""
    return next((w for w in _words(prompt) if w in POSITIONS), None)


def named_shape(prompt: str) -> str | None:
    """The first SHAPES word of `prompt` (whole word, or the grammar's plural: the word + "s"), or None."""
    for w in _words(prompt):
        for shape in (w, w[:-1] if w.endswith("s") else None):
            if shape in SHAPES:
                return shape
    return None


def quoted_text(prompt: str) -> str | None:
    """Text between the first pair of double quotes, or None (the OCR convention)."""
    m = _QUOTED.search(prompt)
    return m.group(1) if m else None


def color_prompt(color: str, shape: str, position: str | None = None, phrasing: int = 0) -> str:
    """A `color`-family prompt: `phrasing` picks the template (0: "a red circle", 1: "a circle painted red")."""
    text = _AN.sub("an ", _COLOR[phrasing % len(_COLOR)].format(color=color, shape=shape))
    return f"{text} {_WHERE[position]}" if position else text


def color_grammar(combos: list[tuple[str, str]] | None = None) -> list[str]:
    """Every colour prompt of the grammar (both phrasings, no position and each position) for `combos`
    (colour, shape) pairs; all pairs when None."""
    combos = combos if combos is not None else [(c, s) for c in PALETTE for s in SHAPES]
    return [
        color_prompt(c, s, pos, phrasing)
        for c, s in combos
        for phrasing in range(len(_COLOR))
        for pos in (None, *POSITIONS)
    ]


def general_grammar() -> list[str]:
    """Every `general` prompt of the grammar."""
    return [t.format(size=z, shape=s) for t in _GENERAL for z in SIZES for s in SHAPES]


def text_grammar() -> list[str]:
    """Every `text` prompt of the grammar."""
    return sorted({t.format(word=w, shape=s) for t in _TEXT for w in WORDS for s in SHAPES})


class _Turns:
    """Values in turn, a fresh seeded order per round: balanced counts over any prefix."""

    def __init__(self, values: tuple[str, ...], rng: random.Random) -> None:
        self.values, self.rng, self.queue = values, rng, []

    def next(self) -> str:
        if not self.queue:
            self.queue = list(self.values)
            self.rng.shuffle(self.queue)
        return self.queue.pop()


def generate_prompts(num_prompts: int, seed: int = 0) -> list[tuple[str, str]]:
    """`num_prompts` unique (prompt, family) pairs, families cycling general/color/text (1:1:1).

    Colour prompts take the palette colours in turn and every second one a position in turn.
    """
    rng = random.Random(seed)
    colors, positions = _Turns(tuple(PALETTE), rng), _Turns(POSITIONS, rng)
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    n_color = 0
    while len(out) < num_prompts:
        family = FAMILIES[len(out) % 3]
        if family == "color":
            color = colors.next()
            position = positions.next() if n_color % 2 else None
            n_color += 1
        for _ in range(100):
            shape = rng.choice(SHAPES)
            if family == "color":
                prompt = color_prompt(color, shape, position, rng.randrange(len(_COLOR)))
            elif family == "general":
                prompt = rng.choice(_GENERAL).format(size=rng.choice(SIZES), shape=shape)
            else:
                prompt = rng.choice(_TEXT).format(word=rng.choice(WORDS), shape=shape)
            if prompt not in seen:
                break
        else:
            raise ValueError(f"the tiny world has fewer than {num_prompts} distinct prompts")
        seen.add(prompt)
        out.append((prompt, family))
    return out
