"""Build rewards from their config `kind`, and score a batch with all of them.

The registry maps a `kind` to "module:Class" and imports lazily, so building the tiny world's offline
rewards never imports transformers or open_clip. `score_all` keeps the K rewards separate (`[N, K]`):
only the balancer combines them (docs/algorithm.md).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from marble.config import REWARD_KIND_DECLARATIONS
from marble.errors import RewardError
from marble.rewards.base import Reward

log = logging.getLogger(__name__)

REWARD_KINDS: dict[str, str] = {kind: impl for kind, (impl, _rule) in REWARD_KIND_DECLARATIONS.items()}
"""`kind` -> implementing class ("module:Class"), from each kind's declaration in `marble.config`."""


def reward_class(kind: str) -> type:
    """The class implementing `kind` (imported on first use)."""
    if kind not in REWARD_KINDS:
        raise RewardError(f"rewards[].kind={kind!r} is not a known reward; known: {sorted(REWARD_KINDS)}")
    module_name, cls_name = REWARD_KINDS[kind].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def build_reward(spec: Any) -> Reward:
    """One reward from its config node (a member of `marble.config.RewardSpec`)."""
    return reward_class(spec.kind)(spec)


def build_rewards(specs: Sequence[Any]) -> list[Reward]:
    """Rewards in config order (the column order of `score_all`)."""
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RewardError(f"rewards: names must be unique; repeated: {dupes}")
    return [build_reward(s) for s in specs]


ScoreMode = Literal["train", "eval"]


def score_all(
    rewards: Sequence[Reward],
    images: Tensor,
    prompts: list[str],
    metadata: list[dict] | None = None,
    *,
    mode: ScoreMode = "train",
    **counts: dict[str, int] | None,
) -> Tensor:
    """Score `images` `[N, 3, H, W]` with every reward: returns `[N, K]` float64, columns in reward order.

    mode="train" gives each reward's training score; mode="eval" the score its paper reports where that
    differs (a reward's `eval_extra`: GenEval's binary accuracy, PickScore's raw logit scale).
    `counts` (`nonfinite_counts`, `out_of_range_counts`) and the NaN conventions: see `score_modes`.
    """
    return score_modes(rewards, images, prompts, metadata, modes=(mode,), **counts)[mode]


def score_modes(
    rewards: Sequence[Reward],
    images: Tensor,
    prompts: list[str],
    metadata: list[dict] | None = None,
    *,
    nonfinite_counts: dict[str, int] | None = None,
    out_of_range_counts: dict[str, int] | None = None,
    modes: Sequence[ScoreMode] = ("train", "eval"),
) -> dict[str, Tensor]:
    """`score_all` in several modes from ONE call of each reward: mode -> `[N, K]` float64.

    NaN where a reward does not apply (a value, not an error). An UNEXPECTED non-finite score (inf, or
    NaN for a prompt the reward claims to apply to) is set to NaN so it is excluded like "not
    applicable", counted per reward in `nonfinite_counts` (if given; once per image, whatever the
    modes) and logged as a warning. A reward with a `range_policy` (scores from outside marble) has its
    out-of-range scores refused or clamped, counted once per image in `out_of_range_counts`.
    """
    metadata = metadata if metadata is not None else [{} for _ in prompts]
    columns: dict[str, list[Tensor]] = {m: [] for m in modes}
    for reward in rewards:
        out = reward(images, prompts, metadata)
        applies = torch.tensor(
            [reward.applies_to(p, m) for p, m in zip(prompts, metadata, strict=True)], dtype=torch.bool
        )  # [N]
        bad_any = torch.zeros(len(prompts), dtype=torch.bool)  # [N]
        for i, mode in enumerate(modes):
            key = getattr(reward, "eval_extra", None) if mode == "eval" else None
            scores, bad = _clean_column(reward.name, out.extras.get(key, out.scores), applies)  # [N], [N]
            columns[mode].append(enforce_range(reward, scores, out_of_range_counts if i == 0 else None))
            bad_any |= bad
        num_bad = int(bad_any.sum())
        if num_bad:
            if nonfinite_counts is not None:
                nonfinite_counts[reward.name] = nonfinite_counts.get(reward.name, 0) + num_bad
            log.warning(
                "reward %r: %d unexpected non-finite score(s) of %d; excluded",
                reward.name,
                num_bad,
                len(prompts),
            )
    empty = torch.empty(len(prompts), 0, dtype=torch.float64)
    return {m: torch.stack(cols, dim=1) if cols else empty for m, cols in columns.items()}  # [N, K]


def _clean_column(name: str, values: Tensor, applies: Tensor) -> tuple[Tensor, Tensor]:
    """One reward's scores `[N]` as float64 with NaN where it does not apply, and the mask of
    unexpected non-finite scores (set to NaN)."""
    scores = values.to("cpu", torch.float64).reshape(-1)  # [N]
    if scores.shape[0] != applies.shape[0]:
        raise RewardError(f"reward {name!r} returned {scores.shape[0]} scores for {applies.shape[0]} images")
    scores = scores.masked_fill(~applies, math.nan)  # "does not apply" is always NaN
    bad = torch.isinf(scores) | (torch.isnan(scores) & applies)  # [N]
    return scores.masked_fill(bad, math.nan), bad


def enforce_range(reward: Reward, scores: Tensor, counts: dict[str, int] | None) -> Tensor:
    """`scores` `[N]` with those outside `reward.score_range` refused (NaN) or clamped, per the reward's
    `range_policy` (None: returned as is); the number changed is added to `counts[reward.name]`."""
    policy = getattr(reward, "range_policy", None)
    if policy is None:
        return scores
    lo, hi = reward.score_range
    outside = (scores < lo) | (scores > hi)  # [N]; NaN compares False
    num = int(outside.sum())
    if not num:
        return scores
    if counts is not None:
        counts[reward.name] = counts.get(reward.name, 0) + num
    log.warning(
        "reward %r: %d score(s) of %d outside [%g, %g]; %s", reward.name, num, len(scores), lo, hi,
        "excluded" if policy == "refuse" else "clamped",
    )  # fmt: skip
    if policy == "refuse":
        return scores.masked_fill(outside, math.nan)
    return scores.clamp(lo, hi)
