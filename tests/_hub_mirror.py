"""A local hub mirror of the paper config: tiny models of the REAL classes under the real hub ids.

`build_paper_mirror(root, tiny_sd3)` lays out `<root>/<org>/<name>/` for every repo that
`configs/sd35m-marble.yaml` loads (the SD3.5 base model, PickScore and its laion processor, CLIP ViT-L/14,
the aesthetic head, ImageReward and its BERT tokenizer, HPSv2, TrOCR, OWLv2), each saved as its hub repo
is (`save_pretrained` directories, torch pickles where the real repo ships pickles), so the reward
loaders read them through exactly the code that reads the published weights. HPSv2 needs open_clip,
which cannot import beside this machine's torch: `fake_open_clip` is a stand-in with the same two entry
points marble uses.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import torch
from _tiny_reward_models import (
    save_tiny_aesthetic_head,
    save_tiny_clip,
    save_tiny_owlv2,
    save_tiny_trocr,
)
from torch import nn

from marble.rewards.clip import aesthetic_mlp

MED = {
    "vocab_size": 40, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 64, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
    "pad_token_id": 0, "add_cross_attention": True,
}  # fmt: skip
BERT_WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *"abcdefghijklmnopqrstuvwxyz",
    "red",
    "dog",
    "sign",
]


def to_blip_names(vision_sd: dict) -> dict:
    """transformers -> BLIP/timm names, written independently of the loader's regexes."""
    out = {}
    for k, v in vision_sd.items():
        k = k.replace("embeddings.class_embedding", "cls_token").replace(
            "embeddings.position_embedding", "pos_embed"
        )
        k = k.replace("embeddings.patch_embedding.", "patch_embed.proj.").replace("post_layernorm.", "norm.")
        k = (
            k.replace("encoder.layers.", "blocks.")
            .replace("layer_norm1", "norm1")
            .replace("layer_norm2", "norm2")
        )
        k = k.replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv")
        out[k] = v
    return out


def save_tiny_imagereward(model_dir: Path, tokenizer_dir: Path, seed: int = 0):
    """`ImageReward.pt` (BLIP naming) + `med_config.json`, and a BERT tokenizer; returns the modules."""
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    torch.manual_seed(seed)
    vision = BlipVisionModel(
        BlipVisionConfig(hidden_size=64, intermediate_size=70, num_hidden_layers=2, num_attention_heads=1,
                         image_size=32, patch_size=8, layer_norm_eps=1e-6)
    ).eval()  # fmt: skip
    text_cfg = BlipTextConfig(
        **{k: v for k, v in MED.items() if k != "add_cross_attention"}, encoder_hidden_size=64
    )
    text = BlipTextModel(text_cfg, add_pooling_layer=False).eval()
    head = aesthetic_mlp()
    head[0] = nn.Linear(32, 1024)
    head.eval()
    state = {f"blip.visual_encoder.{k}": v for k, v in to_blip_names(vision.state_dict()).items()}
    state |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    state |= {f"mlp.layers.{k}": v for k, v in head.state_dict().items()}
    state["blip.vision_proj.weight"] = torch.zeros(4, 64)  # present in the real file, unused by the scorer
    model_dir.mkdir(parents=True)
    torch.save(state, model_dir / "ImageReward.pt")
    (model_dir / "med_config.json").write_text(json.dumps(MED))
    tokenizer_dir.mkdir(parents=True)
    (tokenizer_dir / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    tok = BertTokenizer(vocab_file=str(tokenizer_dir / "vocab.txt"))
    tok.save_pretrained(tokenizer_dir)
    return vision, text, head, tok


class FakeOpenClipModel(nn.Module):
    """What HPS needs from an open_clip model: `visual`, `encode_image`, `encode_text`."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Linear(3 * 16 * 16, 8)
        self.visual.image_size = 16
        self.token_embedding = nn.Embedding(128, 8)

    def encode_image(self, x):
        return self.visual(x.flatten(1))

    def encode_text(self, ids):
        return self.token_embedding(ids).mean(dim=1)


def fake_open_clip() -> types.ModuleType:
    mod = types.ModuleType("open_clip")
    mod.create_model = lambda name, pretrained=None, device="cpu": FakeOpenClipModel()
    mod.get_tokenizer = lambda name: (
        lambda texts: torch.tensor([[ord(c) % 128 for c in t.ljust(12)[:12]] for t in texts])
    )
    return mod


PAPER_REPOS = (
    "stabilityai/stable-diffusion-3.5-medium", "yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "openai/clip-vit-large-patch14", "camenduru/improved-aesthetic-predictor", "THUDM/ImageReward",
    "google-bert/bert-base-uncased", "xswu/HPSv2", "microsoft/trocr-base-printed", "google/owlv2-base-patch16-ensemble",
)  # fmt: skip


def build_paper_mirror(root: Path, tiny_sd3: Path) -> Path:
    """Every repo of configs/sd35m-marble.yaml, tiny, under its hub id (see the module docstring)."""
    shutil.copytree(tiny_sd3, root / PAPER_REPOS[0])
    for seed, repo in enumerate(PAPER_REPOS[1:4]):
        save_tiny_clip(root / repo, seed=seed)
    head = save_tiny_aesthetic_head(root / PAPER_REPOS[4], embed_dim=16, fmt="pth")
    head.rename(head.with_name("sac+logos+ava1-l14-linearMSE.pth"))
    save_tiny_imagereward(root / PAPER_REPOS[5], root / PAPER_REPOS[6])
    (root / PAPER_REPOS[7]).mkdir(parents=True)
    torch.manual_seed(7)
    state = {f"module.{k}": v for k, v in FakeOpenClipModel().state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, root / PAPER_REPOS[7] / "HPS_v2.1_compressed.pt")
    save_tiny_trocr(root / PAPER_REPOS[8])
    save_tiny_owlv2(root / PAPER_REPOS[9])
    return root
