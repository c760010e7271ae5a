"""ImageReward: a tiny checkpoint in the ORIGINAL BLIP naming (as `ImageReward.pt` ships) is loaded by the
real code path and scored exactly like the published forward pass, written out here by hand."""

from __future__ import annotations

import json

import pytest
import torch
from _hub_mirror import MED, save_tiny_imagereward

from marble.config import ImageRewardReward
from marble.errors import RewardError
from marble.rewards import build_reward
from marble.rewards.hps import clip_preprocess
from marble.rewards.imagereward import REWARD_MEAN, REWARD_STD, vision_key


@pytest.fixture(scope="module")
def tiny_imagereward(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagereward")
    vision, text, head, tok = save_tiny_imagereward(root / "ImageReward", root / "bert")
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
