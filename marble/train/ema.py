"""The evaluation EMA of the trainable LoRA weights (docs/algorithm.md §5; DiffusionNFT `EMAModuleWrapper`).

decay_k = min((1 + k) / (10 + k), decay) after the k-th update (warm-up, then 0.9). Kept apart from
the trainable weights: it is what evaluation uses, never what training resumes from.
"""

from __future__ import annotations

import torch


class EvalEMA:
    """Shadow copies (float32, same device) of named parameters."""

    def __init__(self, named_params: dict[str, torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: p.detach().float().clone() for k, p in named_params.items()}

    def current_decay(self) -> float:
        k = self.num_updates
        return min((1 + k) / (10 + k), self.decay)

    @torch.no_grad()
    def update(self, named_params: dict[str, torch.Tensor]) -> None:
        d = self.current_decay()
        for k, p in named_params.items():
            self.shadow[k].mul_(d).add_(p.detach().float(), alpha=1.0 - d)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = set(self.shadow) - set(sd)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for k in self.shadow:
            self.shadow[k].copy_(sd[k])
        self.num_updates = num_updates
