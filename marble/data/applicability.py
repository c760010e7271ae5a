"""Which reward applies to which prompt: the rules, and the one function every stage asks.

Specialist rewards score only some prompts and return NaN elsewhere (MARBLE's per-reward
advantages are taken over the prompts a reward applies to). The `prepare` stage counts
applicability per configured reward so that a prompt set in which, say, no prompt carries quoted
text fails loudly instead of training an OCR reward on nothing. Rewards should answer `applies_to`
with `spec_applies(self.spec, prompt, metadata)`, so the counts in the manifest are exactly what
training sees. Which rule a reward kind follows is declared with the kind (`marble.config`).

Pure: (reward kind or spec, prompt, metadata) -> bool. No files, no models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from marble.config import REWARD_KIND_DECLARATIONS
from marble.data.tiny_world import named_colors, named_position, quoted_text


def always(prompt: str, metadata: Mapping[str, Any]) -> bool:
    """General rewards (quality, preference, alignment models) score every prompt."""
    return True


def has_quoted_text(prompt: str, metadata: Mapping[str, Any]) -> bool:
    """OCR convention (DiffusionNFT's ocr set): the text to render is between the first pair of double
    quotes; it must be non-empty after removing whitespace (else there is nothing to read)."""
    text = quoted_text(prompt)
    return text is not None and bool(text.strip())


def has_palette_color(prompt: str, metadata: Mapping[str, Any]) -> bool:
    """The tiny world's colour-match reward needs a colour word from its PALETTE (whole word)."""
    return bool(named_colors(prompt))


def has_position(prompt: str, metadata: Mapping[str, Any]) -> bool:
    """The tiny world's position reward needs a POSITIONS word (left/right/top/bottom, whole word)."""
    return named_position(prompt) is not None


def has_geneval_metadata(prompt: str, metadata: Mapping[str, Any]) -> bool:
    """GenEval scores only prompts that carry its metadata: a non-empty `include` list of objects."""
    include = metadata.get("include")
    return isinstance(include, list) and len(include) > 0 and all(isinstance(o, Mapping) for o in include)


RULES: dict[str, Callable[[str, Mapping[str, Any]], bool]] = {
    "always": always,
    "quoted_text": has_quoted_text,
    "named_color": has_palette_color,
    "named_position": has_position,
    "geneval_metadata": has_geneval_metadata,
}
"""Applicability rules by name (the names `http` rewards choose from with `applies_when`)."""

KIND_RULES: dict[str, str] = {
    kind: rule for kind, (_impl, rule) in REWARD_KIND_DECLARATIONS.items() if rule is not None
}
"""The rule of each reward kind whose applicability is fixed by its kind (declared in `marble.config`)."""


def rule_applies(rule: str, prompt: str, metadata: Mapping[str, Any] | None = None) -> bool:
    """Whether the named rule (a key of RULES) holds for `prompt` with `metadata`."""
    if rule not in RULES:
        raise ValueError(f"unknown applicability rule {rule!r}; known: {sorted(RULES)}")
    return RULES[rule](prompt, metadata or {})


def reward_applies(kind: str, prompt: str, metadata: Mapping[str, Any] | None = None) -> bool:
    """Whether a reward of `kind` scores `prompt` (with its `metadata`); False means it returns NaN.

    Raises ValueError for a kind without a fixed rule (kinds whose rule is a config field, like `http`,
    go through `spec_applies`).
    """
    rule = KIND_RULES.get(kind)
    if rule is None:
        raise ValueError(
            f"reward kind {kind!r} has no fixed applicability rule (its config class declares `applicability`)"
            " (use spec_applies for rewards whose rule is configured)"
        )
    return rule_applies(rule, prompt, metadata)


def spec_applies(spec: Any, prompt: str, metadata: Mapping[str, Any] | None = None) -> bool:
    """Whether the configured reward `spec` scores `prompt`: its `applies_when` rule if it has one
    (HTTP rewards), else the rule of its kind."""
    rule = getattr(spec, "applies_when", None)
    if rule is not None:
        return rule_applies(rule, prompt, metadata)
    return reward_applies(spec.kind, prompt, metadata)
