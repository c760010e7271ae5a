"""Which reward applies to which prompt: the ONE place this rule lives.

Specialist rewards score only some prompts and return NaN elsewhere (MARBLE's per-reward
advantages are taken over the prompts a reward applies to). The `prepare` stage counts
applicability per configured reward so that a prompt set in which, say, no prompt carries quoted
text fails loudly instead of training an OCR reward on nothing; the rewards import the same
function for their `applies_to`, so the counts in the manifest are exactly what training sees.

Pure: (reward kind, prompt, metadata) -> bool. No files, no models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from marble.data.tiny_world import named_colors, quoted_text

GENERAL_KINDS = frozenset(
    {
        "brightness",
        "colorfulness",
        "jpeg_compressibility",
        "pickscore",
        "clipscore",
        "hpsv21",
        "aesthetic",
        "imagereward",
    }
)
"""Reward kinds that score every prompt (image quality / preference / alignment models)."""


def has_quoted_text(prompt: str, metadata: Mapping[str, Any]) -> bool:
    """OCR convention (DiffusionNFT's ocr set): the text to render is between the first pair of double quotes."""
    text = quoted_text(prompt)
    return text is not None and bool(text.strip())


def has_palette_color(prompt: str, metadata: Mapping[str, Any]) -> bool:
    """The tiny world's colour-match reward needs a colour word from its PALETTE."""
    return bool(named_colors(prompt))


def has_geneval_metadata(prompt: str, metadata: Mapping[str, Any]) -> bool:
    """GenEval scores only prompts that carry its metadata: a non-empty `include` list of objects."""
    include = metadata.get("include")
    return isinstance(include, list) and len(include) > 0 and all(isinstance(o, Mapping) for o in include)


_SPECIALISTS: dict[str, Callable[[str, Mapping[str, Any]], bool]] = {
    "ocr": has_quoted_text,
    "edge_detail": has_quoted_text,
    "color_match": has_palette_color,
    "geneval": has_geneval_metadata,
}

KNOWN_KINDS = GENERAL_KINDS | frozenset(_SPECIALISTS)


def reward_applies(kind: str, prompt: str, metadata: Mapping[str, Any] | None = None) -> bool:
    """Whether a reward of `kind` scores `prompt` (with its `metadata`); False means it returns NaN.

    Raises ValueError for an unknown kind so that a new reward must declare its rule here.
    """
    if kind in GENERAL_KINDS:
        return True
    rule = _SPECIALISTS.get(kind)
    if rule is None:
        raise ValueError(f"reward kind {kind!r} has no applicability rule in marble/data/applicability.py")
    return rule(prompt, metadata or {})
