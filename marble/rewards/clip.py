"""CLIP-based rewards: PickScore, CLIPScore and the LAION aesthetic predictor (transformers).

Preprocessing, the same for all three: images `[N, 3, H, W]` in [0, 1] are rounded to uint8 RGB (what a
saved PNG would hold, and what the reference scorers receive as PIL images), then the checkpoint's own
`CLIPImageProcessor` resizes the shortest side (bicubic), centre-crops and normalises with its mean/std.
Prompts go through the checkpoint's tokenizer, truncated to its 77 tokens.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from marble.errors import RewardError
from marble.hub import Artifact, Hub, load_state_dict_file
from marble.images import to_pil
from marble.rewards.base import BaseReward, RewardOutput

log = logging.getLogger(__name__)


def _pooled(out) -> Tensor:
    """Projected features from `get_*_features` (a tensor in transformers 4, a model output in 5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


@torch.no_grad()
def clip_image_embeds(model, processor, images: Tensor, device) -> Tensor:
    """L2-normalised projected image embeddings `[N, E]`."""
    pixels = processor(images=to_pil(images), return_tensors="pt")["pixel_values"].to(device)
    emb = _pooled(model.get_image_features(pixel_values=pixels)).float()  # [N, E]
    return emb / emb.norm(dim=-1, keepdim=True)


@torch.no_grad()
def clip_text_embeds(model, tokenizer, prompts: list[str], device) -> Tensor:
    """L2-normalised projected text embeddings `[N, E]` (truncated to the tokenizer's length)."""
    max_len = getattr(model.config, "text_config", model.config).max_position_embeddings
    tok = tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(
        device
    )
    emb = _pooled(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
    emb = emb.float()  # [N, E]
    return emb / emb.norm(dim=-1, keepdim=True)


class _ClipReward(BaseReward):
    """Loads a `CLIPModel` and its processor (the processor may live in another repo, as for PickScore)."""

    requires_weights = True

    def _processor_source(self) -> tuple[str, str | None]:
        return self.spec.model, self.spec.revision

    @classmethod
    def artifacts(cls, spec) -> list[Artifact]:
        return [Artifact(spec.model, spec.revision)]

    def _load(self, hub: Hub) -> None:
        from transformers import AutoProcessor, CLIPModel

        proc_id, proc_rev = self._processor_source()
        self.processor = hub.from_pretrained(AutoProcessor, proc_id, proc_rev, f"{self.name} processor")
        model = hub.from_pretrained(CLIPModel, self.spec.model, self.spec.revision, f"{self.name} model")
        self.model = model.eval().requires_grad_(False).to(self.device)

    def _cosine(self, images: Tensor, prompts: list[str]) -> Tensor:
        img = clip_image_embeds(self.model, self.processor, images, self.device)  # [n, E]
        txt = clip_text_embeds(self.model, self.processor.tokenizer, prompts, self.device)  # [n, E]
        return (img * txt).sum(dim=-1).double().cpu()  # [n]


class PickScoreScorer(_ClipReward):
    """PickScore (Kirstain et al. 2023): `logit_scale.exp() * cos(image, text)`.

    `scores` is on the TRAINING scale, raw / `spec.scale` (26, as in DiffusionNFT/flow_grpo, so that a
    weighted sum sees it on a scale comparable to the others); `extras["raw"]` is the paper-table scale
    (~20-23 for SD3.5 Medium). Processor `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, model
    `yuvalkirstain/PickScore_v1`.
    """

    score_range = (-100.0 / 26.0, 100.0 / 26.0)  # logit_scale is clamped at 100 in CLIP training
    eval_extra = "raw"  # the paper's table reports the raw scale (SD3.5 Medium base: 20.51)

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self.score_range = (-100.0 / spec.scale, 100.0 / spec.scale)

    def _processor_source(self) -> tuple[str, str | None]:
        return self.spec.processor, self.spec.processor_revision

    @classmethod
    def artifacts(cls, spec) -> list[Artifact]:
        # only the processor files of the (large) laion CLIP repo, not its weights
        processor = Artifact(spec.processor, spec.processor_revision, ("*.json", "*.txt", "*.model"))
        return [Artifact(spec.model, spec.revision), processor]

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        raw = self.model.logit_scale.exp().item() * self._cosine(images, prompts)  # [n]
        return RewardOutput(scores=raw / self.spec.scale, extras={"raw": raw})


class ClipScoreScorer(_ClipReward):
    """CLIPScore as the paper reports it: plain cosine of CLIP ViT-L/14 image and text embeddings."""

    score_range = (-1.0, 1.0)

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        return self._cosine(images, prompts)


def aesthetic_mlp() -> nn.Sequential:
    """The LAION improved-aesthetic-predictor head, 768-1024-128-64-16-1.

    Layer indices match the published state dict (`layers.0/2/4/6/7`); dropout is inert in eval mode.
    """
    return nn.Sequential(
        nn.Linear(768, 1024), nn.Dropout(0.2),
        nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )  # fmt: skip


class AestheticScorer(BaseReward):
    """LAION aesthetic score: CLIP ViT-L/14 image embedding, L2-normalised, into `aesthetic_mlp`.

    About 1-10 (SD3.5 Medium base: 5.13 in the paper); the head is a regression, so not bounded.
    """

    requires_weights = True
    score_range = (-math.inf, math.inf)

    @classmethod
    def artifacts(cls, spec) -> list[Artifact]:
        return [
            Artifact(spec.model, spec.revision),
            Artifact(spec.head, spec.head_revision, (spec.head_file,)),
        ]

    def _load(self, hub: Hub) -> None:
        from transformers import AutoProcessor, CLIPModel

        s = self.spec
        self.processor = hub.from_pretrained(AutoProcessor, s.model, s.revision, f"{self.name} processor")
        clip = hub.from_pretrained(CLIPModel, s.model, s.revision, f"{self.name} CLIP")
        self.clip = clip.eval().requires_grad_(False).to(self.device)
        head_path = hub.file(s.head, s.head_file, s.head_revision)
        state = load_state_dict_file(head_path)
        # the published file is the state dict of an MLP module holding `layers` (a Sequential)
        state = {k.removeprefix("module.").removeprefix("layers."): v for k, v in state.items()}
        head = aesthetic_mlp()
        embed_dim = self.clip.config.projection_dim
        if "0.weight" not in state:
            raise RewardError(f"{head_path}: not an aesthetic MLP state dict (no layers.0.weight)")
        if state["0.weight"].shape[1] != embed_dim:
            raise RewardError(
                f"{head_path}: aesthetic head expects {state['0.weight'].shape[1]}-d embeddings but "
                f"{s.model!r} gives {embed_dim}-d (use CLIP ViT-L/14)"
            )
        if embed_dim != 768:  # tiny test CLIPs: same layer layout, narrower input
            head[0] = nn.Linear(embed_dim, 1024)
        head.load_state_dict(state)
        self.head = head.eval().requires_grad_(False).to(self.device)

    @torch.no_grad()
    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        emb = clip_image_embeds(self.clip, self.processor, images, self.device)  # [n, 768]
        return self.head(emb).squeeze(-1).double().cpu()  # [n]
