"""The reward interface: a `Reward` scores decoded images against their prompts.

Conventions (docs/algorithm.md §2):
- images are float tensors `[N, 3, H, W]` in [0, 1] (what `decode_latents` returns);
- a reward returns one float64 score per image; NaN means "this reward does not apply to this
  prompt" (e.g. OCR on a prompt without quoted text). NaN is a value, not an error;
- weights load lazily in `setup`, so building the reward list from a config is cheap.

`BaseReward` implements the bookkeeping once: input checks, the applicability mask, batching in chunks
of `spec.batch_size` over the applicable images only (a specialist never spends compute on prompts it
does not score) and the NaN fill. Subclasses implement `_score` on applicable images only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from marble.data.applicability import spec_applies
from marble.errors import RewardError
from marble.hub import Artifact, Hub

log = logging.getLogger(__name__)


@dataclass
class RewardOutput:
    """What a reward returns for a batch.

    scores: `[N]` float64, NaN where the reward does not apply.
    extras: optional named `[N]` float64 side scores (e.g. PickScore's raw logit scale, GenEval's binary
        accuracy); never trained on, useful for evaluation and reports.
    """

    scores: Tensor  # [N] float64
    extras: dict[str, Tensor] = field(default_factory=dict)  # name -> [N] float64


@runtime_checkable
class Reward(Protocol):
    """A reward model or rule. See the module docstring for the conventions."""

    name: str
    spec: Any

    def setup(self, device: str | torch.device = "cpu", hub: Hub | None = None) -> None: ...

    def applies_to(self, prompt: str, metadata: dict) -> bool: ...

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput: ...


def check_images(images: Tensor, prompts: list[str], metadata: list[dict] | None, who: str) -> None:
    """Refuse inputs that break the conventions, naming the reward and the offending value."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise RewardError(f"reward {who!r}: images must be a float tensor [N, 3, H, W]; got {shape}")
    if not images.is_floating_point():
        raise RewardError(f"reward {who!r}: images must be float in [0, 1]; got dtype {images.dtype}")
    n = images.shape[0]
    if len(prompts) != n:
        raise RewardError(f"reward {who!r}: {n} images but {len(prompts)} prompts")
    if metadata is not None and len(metadata) != n:
        raise RewardError(f"reward {who!r}: {n} images but {len(metadata)} metadata entries")


class BaseReward:
    """Shared machinery of every builtin reward.

    Class attributes a subclass sets:
        score_range: the documented (low, high) range of a valid score; `rewards check` enforces it.
        range_policy: None (trusted code: `rewards check` tests the range) or, for a reward whose scores
            come from outside (an HTTP server), what `score_all` does with a score outside
            `score_range`: "refuse" (excluded, NaN) or "clamp" (to the bound); both are counted.
        requires_weights: True for model rewards (they need `setup` before scoring).
        eval_extra: name of the `RewardOutput.extras` entry that evaluation reports instead of `scores`
            (`score_all(..., mode="eval")`), e.g. GenEval's binary accuracy; None = `scores`.
    """

    score_range: ClassVar[tuple[float, float]] = (-math.inf, math.inf)
    range_policy: ClassVar[str | None] = None
    requires_weights: ClassVar[bool] = False
    eval_extra: ClassVar[str | None] = None

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.name: str = spec.name
        self.device = torch.device("cpu")
        self._ready = not self.requires_weights

    # ---- protocol
    def setup(self, device: str | torch.device = "cpu", hub: Hub | None = None) -> None:
        """Load weights (model rewards) onto `device` through the run's `Hub` (reward cache, offline
        switch, model lock); without one, from local directories or the hub as named."""
        self.device = torch.device(getattr(self.spec, "device", None) or device)
        self._load(hub or Hub.create())
        self._ready = True

    def applies_to(self, prompt: str, metadata: dict) -> bool:
        """The project's single applicability rule (`marble.data.applicability`), so that the prepare
        stage's per-reward counts are exactly what training sees."""
        return spec_applies(self.spec, prompt, metadata)

    def __call__(
        self, images: Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> RewardOutput:
        check_images(images, prompts, metadata, self.name)
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        if not self._ready:
            self.setup(images.device)
        n = images.shape[0]
        scores = torch.full((n,), math.nan, dtype=torch.float64)  # [N]
        extras: dict[str, Tensor] = {}
        idx = [i for i in range(n) if self.applies_to(prompts[i], metadata[i])]
        bs = max(1, int(getattr(self.spec, "batch_size", n) or n))
        for start in range(0, len(idx), bs):
            chunk = idx[start : start + bs]
            sub = images[chunk].detach().float().clamp(0.0, 1.0)  # [n, 3, H, W]
            out = self._score(sub, [prompts[i] for i in chunk], [metadata[i] for i in chunk])
            if isinstance(out, RewardOutput):
                values, more = out.scores, out.extras
            else:
                values, more = out, {}
            scores[chunk] = values.detach().to("cpu", torch.float64).reshape(-1)
            for key, val in more.items():
                extras.setdefault(key, torch.full((n,), math.nan, dtype=torch.float64))
                extras[key][chunk] = val.detach().to("cpu", torch.float64).reshape(-1)
        return RewardOutput(scores=scores, extras=extras)

    @classmethod
    def artifacts(cls, spec: Any) -> list[Artifact]:
        """Model repos this reward loads (what `marble cache-rewards` snapshots); none for rule rewards."""
        return []

    # ---- for subclasses
    def _load(self, hub: Hub) -> None:
        """Load weights; rule-based rewards have none."""

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor | RewardOutput:
        """Scores of applicable images only: images `[n, 3, H, W]` in [0, 1] -> `[n]`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
