"""Rollouts of the old policy and the epoch buffer they fill (docs/algorithm.md §2).

Per epoch: `prompts_per_epoch` prompts (stratified by family, seeded), G images each, sampled with
the OLD adapter, CFG-free, by the deterministic Euler solver. Only the final clean latents are kept
(plus, through the text-embedding cache, each prompt's embeddings); images are decoded, scored by the
trained rewards (`[N, K]`, NaN = not applicable), gathered over ranks, and turned into per-reward
advantages. Each rank samples distinct whole prompt groups; afterwards every rank holds the whole
epoch's latents, so the training micro-batches (and their seeds) do not depend on the process count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from marble.data.records import PromptRecord
from marble.models.lora import AdapterSwitch
from marble.models.sampling import decode_latents, sample_latents
from marble.rl.advantages import AdvantageStats, group_advantages, optimality_probability
from marble.train.sampler import generator

log = logging.getLogger(__name__)


@dataclass
class EpochBuffer:
    """Everything the update phase of one epoch needs, for ALL ranks' samples (global order)."""

    epoch: int
    prompts: list[PromptRecord]  # [Pg] prompt of each group
    group_size: int
    latents: Tensor  # [N, C, h, w] clean latents x0 of the old policy, N = Pg * G
    rewards: Tensor  # [N, K] float64 raw trained rewards, NaN = not applicable
    r: Tensor  # [N, K'] optimality probability of the balancer's objectives
    mask: Tensor  # [N, K'] bool
    r_raw: Tensor  # [N, K] per-reward r (diagnostics)
    mask_raw: Tensor  # [N, K] bool
    stats: dict[str, float] = field(default_factory=dict)  # epoch-level metrics

    @property
    def num_samples(self) -> int:
        return self.latents.shape[0]

    def state_dict(self) -> dict[str, Any]:
        out = {
            k: getattr(self, k)
            for k in ("epoch", "group_size", "latents", "rewards", "r", "mask", "r_raw", "mask_raw", "stats")
        }
        out["prompts"] = [p.model_dump(mode="json") for p in self.prompts]
        out["latents"] = self.latents.detach().cpu()
        return out

    @classmethod
    def from_state_dict(cls, sd: dict[str, Any]) -> EpochBuffer:
        return cls(**{**sd, "prompts": [PromptRecord.model_validate(p) for p in sd["prompts"]]})


def advantage_targets(
    rewards: Tensor,
    group_size: int,
    objective_advantages: Callable[[Tensor, Tensor, str], Tensor],
    std_mode: str,
    clip_max: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, AdvantageStats]:
    """Per-objective and per-reward (r, mask) from gathered raw rewards `[N, K]`.

    The balancer's `objective_advantages` decides the objectives (per-reward group advantages for the
    per-reward presets, one advantage for `weighted_sum` and `gdpo`); the per-reward ones feed
    diagnostics and logging.
    """
    group_ids = torch.arange(rewards.shape[0]) // group_size  # [N]
    raw = group_advantages(rewards, group_ids, std_mode)  # adv [N, K]
    r_raw, mask_raw = optimality_probability(raw.adv, clip_max)  # [N, K]
    obj_adv = objective_advantages(rewards, group_ids, std_mode)  # [N, K']
    r, mask = optimality_probability(obj_adv, clip_max)  # [N, K']
    return r, mask, r_raw, mask_raw, raw.stats


class RolloutWorker:
    """Samples, decodes and scores one rank's share of an epoch."""

    def __init__(
        self,
        *,
        transformer: Any,
        vae: Any,
        text_cache: Any,
        rewards: Sequence[Any],
        score_all: Callable[..., Tensor],
        sampling: Any,  # SamplingConfig
        latent_shape: tuple[int, int, int],
        seed: int,
        device: torch.device,
        autocast: Callable[[], Any],
    ) -> None:
        self.transformer = transformer
        self.vae = vae
        self.text_cache = text_cache
        self.rewards = rewards
        self.score_all = score_all
        self.cfg = sampling
        self.latent_shape = latent_shape
        self.seed = seed
        self.device = device
        self.autocast = autocast
        self.nonfinite: dict[str, int] = {}
        self.out_of_range: dict[str, int] = {}
        self._adapters: AdapterSwitch | None = None  # found on the first sampling

    @torch.no_grad()
    def sample(self, prompts: list[PromptRecord], epoch: int, first_group: int) -> Tensor:
        """Clean latents `[n * G, C, h, w]` for this rank's prompt groups (global index from `first_group`).

        The initial noise of every image comes from its own generator seeded by its GLOBAL index, so
        the latents are the same whatever the rank layout or `sampling.batch_size`.
        """
        G = self.cfg.group_size
        texts = [p.prompt for p in prompts for _ in range(G)]
        gens = [generator(self.seed, "rollout", epoch, first_group * G + i) for i in range(len(texts))]
        out = []
        if self._adapters is None:
            self._adapters = AdapterSwitch(self.transformer)
        with self._adapters.active("old"), self.autocast():
            for s in range(0, len(texts), self.cfg.batch_size):
                emb = self.text_cache.get(texts[s : s + self.cfg.batch_size])
                out.append(
                    sample_latents(
                        self.transformer,
                        emb,
                        num_steps=self.cfg.num_steps,
                        shift=self.cfg.shift,
                        latent_shape=self.latent_shape,
                        generator=gens[s : s + self.cfg.batch_size],
                    ).float()
                )
        return torch.cat(out)  # [n * G, C, h, w]

    @torch.no_grad()
    def score(self, latents: Tensor, prompts: list[PromptRecord]) -> tuple[Tensor, float]:
        """Decode and score: rewards `[n * G, K]` float64 and the reward time in seconds."""
        G = self.cfg.group_size
        texts = [p.prompt for p in prompts for _ in range(G)]
        meta = [p.metadata for p in prompts for _ in range(G)]
        t0 = time.perf_counter()
        scores = []
        for s in range(0, latents.shape[0], self.cfg.batch_size):
            images = decode_latents(self.vae, latents[s : s + self.cfg.batch_size].to(self.device))
            sl = slice(s, s + self.cfg.batch_size)
            scores.append(
                self.score_all(
                    self.rewards,
                    images.float(),
                    texts[sl],
                    meta[sl],
                    nonfinite_counts=self.nonfinite,
                    out_of_range_counts=self.out_of_range,
                )
            )
        return torch.cat(scores), time.perf_counter() - t0
