"""Prompt embeddings of an SD3 pipeline, and a cache so the trainer can drop the text encoders.

SD3.5's T5-XXL alone is ~9 GB in bf16; rollouts and updates only need the embeddings, so every training
prompt is encoded once, kept here, and the encoders are freed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from marble.errors import InternalError


@dataclass
class PromptEmbeddings:
    prompt_embeds: Tensor  # [N, L, D] joint CLIP + T5 sequence
    pooled: Tensor  # [N, P] pooled CLIP embeddings

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeddings:
        return PromptEmbeddings(
            self.prompt_embeds.to(device=device, dtype=dtype), self.pooled.to(device=device, dtype=dtype)
        )

    def __getitem__(self, idx) -> PromptEmbeddings:
        return PromptEmbeddings(self.prompt_embeds[idx], self.pooled[idx])

    @staticmethod
    def cat(parts: list[PromptEmbeddings]) -> PromptEmbeddings:
        return PromptEmbeddings(
            torch.cat([p.prompt_embeds for p in parts]), torch.cat([p.pooled for p in parts])
        )


@torch.no_grad()  # without it a later second backward fails through the encoders' graph (docs/library-notes.md)
def encode_prompts(pipe, prompts: list[str], max_sequence_length: int) -> PromptEmbeddings:
    """CFG-free SD3 prompt embeddings for `prompts` (the pipeline's own `encode_prompt`)."""
    device = pipe.text_encoder.device if pipe.text_encoder is not None else pipe.transformer.device
    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=list(prompts),
        prompt_2=None,
        prompt_3=None,
        device=device,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return PromptEmbeddings(prompt_embeds.detach(), pooled.detach())


class TextEmbeddingCache:
    """Embeddings by prompt text; encodes a prompt the first time it is asked for."""

    def __init__(self, pipe, max_sequence_length: int) -> None:
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self._store: dict[str, tuple[Tensor, Tensor]] = {}

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._store

    def __len__(self) -> int:
        return len(self._store)

    def get(self, prompts: list[str]) -> PromptEmbeddings:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._store))
        if missing:
            if self.pipe.text_encoder is None:
                raise InternalError(
                    f"{len(missing)} prompt(s) not in the embedding cache after the text encoders were dropped, "
                    f"e.g. {missing[0]!r}"
                )
            emb = encode_prompts(self.pipe, missing, self.max_sequence_length)
            for i, p in enumerate(missing):
                self._store[p] = (emb.prompt_embeds[i], emb.pooled[i])
        rows = [self._store[p] for p in prompts]
        return PromptEmbeddings(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
