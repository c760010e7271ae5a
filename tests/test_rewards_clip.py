"""PickScore, CLIPScore and Aesthetic on tiny random CLIPs saved to disk and loaded by the real code path."""

from __future__ import annotations

import pickle

import pytest
import torch
from _tiny_reward_models import save_tiny_aesthetic_head, save_tiny_clip

from marble.config import AestheticReward, ClipScoreReward, PickScoreReward
from marble.errors import HubError
from marble.images import to_pil
from marble.rewards import build_reward

PROMPTS = ["a red circle", "a blue square", 'a sign that says "open"', "two rings"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    save_tiny_clip(root / "clip", seed=0)
    save_tiny_aesthetic_head(root / "head", embed_dim=16, fmt="pth")
    save_tiny_aesthetic_head(root / "head", embed_dim=16, fmt="safetensors")
    return root


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(0))


def _reference_logits(clip_dir, images, prompts):
    """Independent route: CLIPModel.forward's logits_per_image = logit_scale.exp() * cos, diagonal."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    inputs = proc(text=prompts, images=to_pil(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image  # [N, N]
    return logits.diagonal().double(), model.logit_scale.exp().item()


def test_pickscore_and_clipscore_match_clip_forward(tiny_dirs, images):
    clip_dir = str(tiny_dirs / "clip")
    ref, scale = _reference_logits(clip_dir, images, PROMPTS)
    pick = build_reward(PickScoreReward(name="pickscore", model=clip_dir, processor=clip_dir))
    pick.setup("cpu")
    out = pick(images, PROMPTS, [{}] * 4)
    torch.testing.assert_close(out.extras["raw"], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.scores, ref / 26.0, atol=1e-5, rtol=1e-4)  # the training scale
    from marble.rewards import score_all

    torch.testing.assert_close(score_all([pick], images, PROMPTS, None, mode="eval")[:, 0], out.extras["raw"])
    clip = build_reward(ClipScoreReward(name="clipscore", model=clip_dir, batch_size=3))  # two chunks
    cos = clip(images, PROMPTS, [{}] * 4).scores
    torch.testing.assert_close(cos, ref / scale, atol=1e-5, rtol=1e-4)
    assert cos.abs().max() <= 1 and cos.std() > 0  # a random CLIP still separates pairs


def test_aesthetic_head_on_normalised_embedding(tiny_dirs, images):
    from transformers import CLIPModel, CLIPProcessor

    from marble.hub import load_state_dict_file
    from marble.rewards.clip import aesthetic_mlp

    clip_dir = str(tiny_dirs / "clip")
    scores = {}
    for head_file in ("head.pth", "head.safetensors"):
        spec = AestheticReward(
            name="aesthetic", model=clip_dir, head=str(tiny_dirs / "head"), head_file=head_file
        )
        r = build_reward(spec)
        r.setup("cpu")
        scores[head_file] = r(images, PROMPTS, [{}] * 4).scores
    # by hand: embedding / |embedding| -> MLP
    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    head = aesthetic_mlp()
    head[0] = torch.nn.Linear(16, 1024)
    published = load_state_dict_file(tiny_dirs / "head" / "head.pth")
    assert "layers.0.weight" in published  # the LAION file's naming
    head.load_state_dict({k.removeprefix("layers."): v for k, v in published.items()})
    with torch.no_grad():
        px = proc(images=to_pil(images), return_tensors="pt")["pixel_values"]
        emb = model.visual_projection(model.vision_model(pixel_values=px).pooler_output)
        expected = head.eval()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1).double()
    torch.testing.assert_close(scores["head.pth"], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scores["head.safetensors"], expected, atol=1e-6, rtol=1e-5)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_and_missing_paths_are_refused(tiny_dirs, tmp_path, images):
    bad = tmp_path / "head.pth"
    with open(bad, "wb") as f:
        pickle.dump({"layers.0.weight": _Evil()}, f)
    spec = AestheticReward(name="a", model=str(tiny_dirs / "clip"), head=str(tmp_path), head_file="head.pth")
    with pytest.raises(HubError, match="weights only"):
        build_reward(spec).setup("cpu")
    with pytest.raises(HubError, match="does not exist"):
        build_reward(ClipScoreReward(name="c", model=str(tmp_path / "nope"))).setup("cpu")
    spec = AestheticReward(
        name="a", model=str(tiny_dirs / "clip"), head=str(tmp_path), head_file="missing.pth"
    )
    with pytest.raises(HubError, match="missing.pth"):
        build_reward(spec).setup("cpu")


def test_unreachable_hub_id_is_a_hub_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = build_reward(ClipScoreReward(name="c", model="marble-tests/does-not-exist", revision="0" * 40))
    with pytest.raises(HubError, match="marble-tests/does-not-exist"):
        r.setup("cpu")
