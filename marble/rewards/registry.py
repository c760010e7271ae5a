"""Build rewards from their config `kind`, and score a batch with all of them.

The registry maps a `kind` to "module:Class" and imports lazily, so building the tiny world's offline
rewards never imports transformers or open_clip. `score_all` keeps the K rewards separate (`[N, K]`):
only the balancer combines them (STYLE.md).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from marble.errors import RewardError
from marble.rewards.base import Reward

log = logging.getLogger(__name__)

REWARD_KINDS: dict[str, str] = {
    "brightness": "marble.rewards.offline:BrightnessScorer",
    "colorfulness": "marble.rewards.offline:ColorfulnessScorer",
    "jpeg_compressibility": "marble.rewards.offline:JpegCompressibilityScorer",
    "color_match": "marble.rewards.offline:ColorMatchScorer",
    "edge_detail": "marble.rewards.offline:EdgeDetailScorer",
    "pickscore": "marble.rewards.clip:PickScoreScorer",
    "clipscore": "marble.rewards.clip:ClipScoreScorer",
    "aesthetic": "marble.rewards.clip:AestheticScorer",
    "hpsv21": "marble.rewards.hps:HPSv21Scorer",
    "imagereward": "marble.rewards.imagereward:ImageRewardScorer",
    "ocr": "marble.rewards.ocr:OcrScorer",
    "geneval": "marble.rewards.geneval:GenEvalScorer",
    "http": "marble.rewards.http:HttpScorer",
}
"""`kind` -> implementing class ("module:Class"); the config's `RewardSpec` union lists the same kinds."""


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


def score_all(
    rewards: Sequence[Reward],
    images: Tensor,
    prompts: list[str],
    metadata: list[dict] | None = None,
    *,
    nonfinite_counts: dict[str, int] | None = None,
    mode: Literal["train", "eval"] = "train",
) -> Tensor:
    """Score `images` `[N, 3, H, W]` with every reward: returns `[N, K]` float64, columns in reward order.

    mode="train" gives each reward's training score; mode="eval" the score its paper reports where that
    differs (a reward's `eval_extra`: GenEval's binary accuracy, PickScore's raw logit scale).

    NaN where a reward does not apply (a value, not an error). An UNEXPECTED non-finite score (inf, or
    NaN for a prompt the reward claims to apply to) is set to NaN so it is excluded like "not
    applicable", counted per reward in `nonfinite_counts` (if given) and logged as a warning.
    """
    metadata = metadata if metadata is not None else [{} for _ in prompts]
    columns = []
    for reward in rewards:
        out = reward(images, prompts, metadata)
        key = getattr(reward, "eval_extra", None) if mode == "eval" else None
        scores = out.extras.get(key, out.scores).to("cpu", torch.float64).reshape(-1)  # [N]
        if scores.shape[0] != len(prompts):
            raise RewardError(
                f"reward {reward.name!r} returned {scores.shape[0]} scores for {len(prompts)} images"
            )
        applies = torch.tensor(
            [reward.applies_to(p, m) for p, m in zip(prompts, metadata, strict=True)], dtype=torch.bool
        )
        scores = scores.masked_fill(~applies, math.nan)  # "does not apply" is always NaN
        bad = torch.isinf(scores) | (torch.isnan(scores) & applies)  # [N]
        num_bad = int(bad.sum())
        if num_bad:
            scores = scores.masked_fill(bad, math.nan)
            if nonfinite_counts is not None:
                nonfinite_counts[reward.name] = nonfinite_counts.get(reward.name, 0) + num_bad
            log.warning(
                "reward %r: %d unexpected non-finite score(s) of %d; excluded",
                reward.name,
                num_bad,
                len(prompts),
            )
        columns.append(scores)
    return (
        torch.stack(columns, dim=1) if columns else torch.empty(len(prompts), 0, dtype=torch.float64)
    )  # [N, K]
