"""HPSv2.1: the missing-extra error, the weights-only checkpoint path, preprocessing and the score.

open_clip needs torchvision, which does not import beside this machine's torch build, so the real
package cannot run here: the loading path is exercised with a stand-in `open_clip` module that has the
same two entry points marble uses (`create_model`, `get_tokenizer`).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from marble.config import HPSv21Reward
from marble.errors import RewardError
from marble.rewards import build_reward
from marble.rewards.hps import OPENAI_MEAN, OPENAI_STD, clip_preprocess, unwrap_state_dict


class _Visual(nn.Module):
    image_size = 16

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3 * 16 * 16, 8)


class _FakeClip(nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = _Visual()
        self.token_embedding = nn.Embedding(128, 8)

    def encode_image(self, x):
        return self.visual.proj(x.flatten(1))

    def encode_text(self, ids):
        return self.token_embedding(ids).mean(dim=1)


def _tokenize(texts):
    return torch.tensor([[ord(c) % 128 for c in t.ljust(12)[:12]] for t in texts])


@pytest.fixture
def fake_open_clip(monkeypatch):
    calls = {}

    def create_model(name, pretrained=None, device="cpu"):
        calls["create"] = (name, pretrained)
        torch.manual_seed(123)  # different init from the checkpoint: loading must matter
        return _FakeClip()

    mod = types.ModuleType("open_clip")
    mod.create_model, mod.get_tokenizer = create_model, lambda name: _tokenize
    monkeypatch.setitem(sys.modules, "open_clip", mod)
    return calls


def test_missing_open_clip_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import fails as when not installed
    with pytest.raises(RewardError, match=r"marble\[hps\]"):
        build_reward(HPSv21Reward(name="hps", model="unused")).setup("cpu")


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_checkpoint_loaded_weights_only_and_scored_as_cosine(tmp_path, fake_open_clip, fmt):
    torch.manual_seed(0)
    trained = _FakeClip()
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    if fmt == "pt":
        torch.save(
            {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "hps.pt"
        )
    else:
        from safetensors.torch import save_file

        save_file(state, str(tmp_path / "hps.safetensors"))
    spec = HPSv21Reward(name="hps", model=str(tmp_path), checkpoint_file=f"hps.{fmt}")
    r = build_reward(spec)
    r.setup("cpu")
    assert fake_open_clip["create"] == ("ViT-H-14", None)  # no pretrained download
    images = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a dog", "a sign"]
    scores = r(images, prompts, None).scores
    with torch.no_grad():
        img = trained.encode_image(clip_preprocess(images, 16))
        txt = trained.encode_text(_tokenize(prompts))
        expected = torch.nn.functional.cosine_similarity(img, txt).double()
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)


def test_mismatched_checkpoint_is_refused(tmp_path, fake_open_clip):
    torch.save({"state_dict": {"something.else": torch.zeros(1)}}, tmp_path / "hps.pt")
    r = build_reward(HPSv21Reward(name="hps", model=str(tmp_path), checkpoint_file="hps.pt"))
    with pytest.raises(RewardError, match="does not fit open_clip"):
        r.setup("cpu")


def test_preprocess_resize_crop_normalise():
    white = torch.ones(1, 3, 30, 60)
    x = clip_preprocess(white, 16)
    assert x.shape == (1, 3, 16, 16)
    expected = (1 - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    torch.testing.assert_close(x[0, :, 8, 8], expected)
    assert unwrap_state_dict({"state_dict": {"module.a": 1}}) == {"a": 1}
