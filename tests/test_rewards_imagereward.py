"""ImageReward: a tiny checkpoint in the ORIGINAL BLIP naming (as `ImageReward.pt` ships) is loaded by the
real code path and scored exactly like the published forward pass, written out here by hand."""

from __future__ import annotations

import json

import pytest
import torch

from marble.config import ImageRewardReward
from marble.errors import RewardError
from marble.rewards import build_reward
from marble.rewards.clip import aesthetic_mlp
from marble.rewards.hps import clip_preprocess
from marble.rewards.imagereward import REWARD_MEAN, REWARD_STD, vision_key

MED = {
    "vocab_size": 40, "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 64, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
    "pad_token_id": 0, "add_cross_attention": True,
}  # fmt: skip


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


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    root = tmp_path_factory.mktemp("imagereward")
    torch.manual_seed(0)
    vision = BlipVisionModel(
        BlipVisionConfig(hidden_size=64, intermediate_size=70, num_hidden_layers=2, num_attention_heads=1,
                         image_size=32, patch_size=8, layer_norm_eps=1e-6)
    ).eval()  # fmt: skip
    text = BlipTextModel(
        BlipTextConfig(
            **{k: v for k, v in MED.items() if k != "add_cross_attention"}, encoder_hidden_size=64
        ),
        add_pooling_layer=False,
    ).eval()
    head = aesthetic_mlp()
    head[0] = torch.nn.Linear(32, 1024)
    head.eval()
    state = {f"blip.visual_encoder.{k}": v for k, v in to_blip_names(vision.state_dict()).items()}
    state |= {f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()}
    state |= {f"mlp.layers.{k}": v for k, v in head.state_dict().items()}
    state["blip.vision_proj.weight"] = torch.zeros(4, 64)  # present in the real file, unused by the scorer
    model_dir = root / "ImageReward"
    model_dir.mkdir()
    torch.save(state, model_dir / "ImageReward.pt")
    (model_dir / "med_config.json").write_text(json.dumps(MED))
    words = [
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
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizer(vocab_file=str(root / "vocab.txt"))
    tok.save_pretrained(root / "bert")
    return root, vision, text, head, tok


def test_vision_key_renames():
    assert vision_key("blocks.11.attn.qkv.weight") == "encoder.layers.11.self_attn.qkv.weight"
    assert vision_key("norm.bias") == "post_layernorm.bias"
    with pytest.raises(RewardError, match="unexpected BLIP vision parameter"):
        vision_key("head.weight")


def test_imagereward_matches_the_published_forward(tiny_imagereward):
    root, vision, text, head, tok = tiny_imagereward
    spec = ImageRewardReward(
        name="imagereward", model=str(root / "ImageReward"), tokenizer=str(root / "bert")
    )
    r = build_reward(spec)
    r.setup("cpu")
    images = torch.rand(3, 3, 40, 36, generator=torch.Generator().manual_seed(0))
    prompts = ["a red dog", "a sign", "a dog sign"]
    scores = r(images, prompts, None).scores
    with torch.no_grad():  # the ImageReward.score forward pass, by hand
        emb = vision(pixel_values=clip_preprocess(images, 32)).last_hidden_state
        t = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        assert (t["input_ids"][:, 0] == tok.cls_token_id).all()
        h = text(input_ids=t["input_ids"], attention_mask=t["attention_mask"], encoder_hidden_states=emb,
                 encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long)).last_hidden_state  # fmt: skip
        expected = ((head(h[:, 0]).squeeze(-1) - REWARD_MEAN) / REWARD_STD).double()
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores.std() > 0


def test_not_an_imagereward_checkpoint_is_refused(tmp_path, tiny_imagereward):
    root = tiny_imagereward[0]
    torch.save({"mlp.layers.0.weight": torch.zeros(1)}, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(MED))
    spec = ImageRewardReward(name="ir", model=str(tmp_path), tokenizer=str(root / "bert"))
    with pytest.raises(RewardError, match="not an ImageReward checkpoint"):
        build_reward(spec).setup("cpu")
