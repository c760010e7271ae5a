"""ImageReward (Xu et al. 2023) re-implemented on transformers' BLIP modules, no `image-reward` package.

The published scorer (THUDM/ImageReward, `ImageReward.py`): a BLIP ViT-L/16 image encoder at 224 px; a
BERT-base text encoder with cross-attention to all image tokens, fed the prompt (BERT uncased
tokenizer, padded/truncated to 35 tokens, starting with [CLS]); the [CLS] output state into an MLP
768-1024-128-64-16-1 (no activations, as published); reward = (mlp - 0.16717362830052426) /
1.0333394966054072. Preprocessing: resize shortest side to 224 (bicubic), centre crop, OpenAI CLIP
mean/std (the same transform as HPS here: `hps.clip_preprocess`).

Weights: `ImageReward.pt` (loaded with `weights_only=True`) and `med_config.json` from `THUDM/ImageReward`.
Its keys use BLIP's original names: `blip.text_encoder.*` already match `BlipTextModel`; the timm-style
`blip.visual_encoder.*` are renamed to `BlipVisionModel`'s (`vision_key`). The vision config is read
off the checkpoint's shapes (width, depth, patch, resolution, MLP width); heads = width / 64 (ViT-L: 16).
"""

from __future__ import annotations

import json
import logging
import re

import torch
from torch import Tensor

from marble.errors import RewardError
from marble.hub import Artifact, Hub, load_state_dict_file
from marble.rewards.base import BaseReward
from marble.rewards.clip import aesthetic_mlp
from marble.rewards.hps import clip_preprocess

log = logging.getLogger(__name__)

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_TOKENS = 35
HEAD_DIM = 64

_VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
)


def vision_key(key: str) -> str:
    """BLIP/timm ViT parameter name -> transformers `BlipVisionModel` name."""
    for pattern, repl in _VISION_RENAMES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise RewardError(f"unexpected BLIP vision parameter {key!r} in the ImageReward checkpoint")


def split_checkpoint(state: dict) -> tuple[dict, dict, dict]:
    """(vision, text, mlp) state dicts in transformers naming from an ImageReward checkpoint."""
    vision, text, mlp = {}, {}, {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            vision[vision_key(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder."):
            name = key.removeprefix("blip.text_encoder.")
            if not name.endswith("position_ids"):  # a buffer, rebuilt by the model
                text[name] = value
        elif key.startswith("mlp."):
            mlp[key.removeprefix("mlp.").removeprefix("layers.")] = value  # MLP.layers is a Sequential
    return vision, text, mlp


def vision_config_from(vision: dict):
    """`BlipVisionConfig` read off the checkpoint's tensor shapes."""
    from transformers import BlipVisionConfig

    width = vision["embeddings.class_embedding"].shape[-1]
    patch = vision["embeddings.patch_embedding.weight"].shape[-1]
    tokens = vision["embeddings.position_embedding"].shape[1]
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=max(1, width // HEAD_DIM),
        image_size=int(round((tokens - 1) ** 0.5)) * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,  # BLIP's ViT uses LayerNorm(eps=1e-6)
    )


def text_config_from(med: dict, encoder_width: int):
    """`BlipTextConfig` from BLIP's `med_config.json` (a BERT config with cross-attention)."""
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med.get("max_position_embeddings", 512),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_act=med.get("hidden_act", "gelu"),
        pad_token_id=med.get("pad_token_id", 0),
        encoder_hidden_size=encoder_width,
    )


class ImageRewardScorer(BaseReward):
    """ImageReward: about -2..2 (standardised); SD3.5 Medium base -0.58 in the paper. Unbounded."""

    requires_weights = True

    @classmethod
    def artifacts(cls, spec) -> list[Artifact]:
        tokenizer = Artifact(spec.tokenizer, spec.tokenizer_revision, ("*.json", "*.txt"))
        return [Artifact(spec.model, spec.revision, (spec.checkpoint_file, spec.config_file)), tokenizer]

    def _load(self, hub: Hub) -> None:
        from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel

        s = self.spec
        ckpt = hub.file(s.model, s.checkpoint_file, s.revision)
        med = json.loads(hub.file(s.model, s.config_file, s.revision).read_text())
        vision_sd, text_sd, mlp_sd = split_checkpoint(load_state_dict_file(ckpt))
        if not vision_sd or not text_sd or not mlp_sd:
            raise RewardError(
                f"{ckpt}: not an ImageReward checkpoint (needs blip.visual_encoder, blip.text_encoder, mlp)"
            )
        vision = BlipVisionModel(vision_config_from(vision_sd))
        text = BlipTextModel(text_config_from(med, vision.config.hidden_size), add_pooling_layer=False)
        head = aesthetic_mlp()
        head[0] = torch.nn.Linear(text.config.hidden_size, 1024)
        for part, module, sd in (
            ("vision", vision, vision_sd),
            ("text", text, text_sd),
            ("mlp", head, mlp_sd),
        ):
            missing, unexpected = module.load_state_dict(sd, strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise RewardError(
                    f"{ckpt}: {part} weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})"
                )
        self.vision = vision.eval().requires_grad_(False).to(self.device)
        self.text = text.eval().requires_grad_(False).to(self.device)
        self.head = head.eval().requires_grad_(False).to(self.device)
        self.tokenizer = hub.from_pretrained(
            AutoTokenizer, s.tokenizer, s.tokenizer_revision, "BERT tokenizer"
        )
        self.image_size = vision.config.image_size

    @torch.no_grad()
    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        pixels = clip_preprocess(images, self.image_size).to(self.device)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state  # [n, T, Dv]
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt"
        ).to(self.device)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)  # [n, T]
        out = self.text(
            input_ids=tok["input_ids"],
            attention_mask=tok["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        )
        cls = out.last_hidden_state[:, 0, :].float()  # [n, Dt]
        return ((self.head(cls).squeeze(-1) - REWARD_MEAN) / REWARD_STD).double().cpu()  # [n]
