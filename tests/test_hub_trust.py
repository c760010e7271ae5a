"""Trust boundaries of model weights and the shared volume: what marble refuses, and why.

Each test fails on a loader that trusts the volume or the hub: unpickling on a torch with the
`weights_only` bypass (CVE-2025-32434), pickles loaded from the cache, symbolic links followed out of a
mirror, a snapshot or a checkpoint, a manifest swapped on the volume after the run recorded its hash,
and a local directory named like a hub id shadowing the verified cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _tiny_reward_models import save_tiny_aesthetic_head, save_tiny_clip

from marble.config import AestheticReward, ClipScoreReward
from marble.configio import load_config
from marble.errors import CacheError, CheckpointError, HubError
from marble.hub import Hub, load_state_dict_file
from marble.hub.snapshots import MANIFEST, read_manifest
from marble.io import file_sha256
from marble.model_cache import cache_models, run_hub
from marble.rewards import build_reward
from marble.train.checkpoint import Checkpoint, CheckpointManager

CLIP = "marble-tests/tiny-clip"
HEAD = "marble-tests/tiny-aesthetic"
PROMPTS = ["a red circle", "a ring"]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    save_tiny_clip(root / CLIP, seed=0)
    save_tiny_aesthetic_head(root / HEAD, embed_dim=16, fmt="pth")  # a torch pickle, as the real repo ships
    return root


@pytest.fixture
def images():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _config(**aesthetic):
    reward = f"{{name: a, kind: aesthetic, model: {CLIP}, head: {HEAD}, head_file: head.pth}}"
    return load_config("configs/tiny.yaml", [f"rewards=[{reward}]"])


# ----------------------------------------------------------------------------------- pickles
def test_unpickling_is_refused_on_a_torch_with_the_weights_only_bypass(tmp_path, monkeypatch):
    torch.save({"w": torch.ones(2)}, tmp_path / "head.pth")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "head.safetensors"))
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu121")
    with pytest.raises(HubError, match=r"torch 2\.5\.1.*CVE-2025-32434.*torch>=2\.6"):
        load_state_dict_file(tmp_path / "head.pth")
    assert torch.equal(load_state_dict_file(tmp_path / "head.safetensors")["w"], torch.ones(2))
    monkeypatch.setattr(torch, "__version__", "2.6.0")
    assert torch.equal(load_state_dict_file(tmp_path / "head.pth")["w"], torch.ones(2))


def test_the_cache_converts_pickles_once_and_loads_only_safetensors(tmp_path, mirror, monkeypatch, images):
    cfg = _config()
    cache = tmp_path / "cache"
    cache_models(cfg, cache, mirror=mirror)
    (entry,) = [e for e in read_manifest(cache)["artifacts"] if e["id"] == HEAD]
    assert [f["path"] for f in entry["files"]] == ["head.safetensors"]
    assert entry["files"][0]["converted_from"]["sha256"] == file_sha256(mirror / HEAD / "head.pth")
    assert not list((cache / entry["path"]).glob("*.pth"))
    direct = build_reward(
        AestheticReward(name="a", model=str(mirror / CLIP), head=str(mirror / HEAD), head_file="head.pth")
    )
    expected = direct(images, PROMPTS, None).scores

    def no_unpickling(*a, **k):
        raise AssertionError("torch.load called: a pickle was loaded from the cache")

    monkeypatch.setattr(torch, "load", no_unpickling)
    reward = build_reward(cfg.rewards[0])
    reward.setup("cpu", Hub(cache_dir=cache))
    torch.testing.assert_close(reward(images, PROMPTS, None).scores, expected)


# ----------------------------------------------------------------------------------- symbolic links
def test_a_symlink_in_a_mirror_is_refused_and_nothing_is_copied(tmp_path):
    secret = tmp_path / "var-run-secrets-token"
    secret.write_text("eyJhbGciOiJSUzI1NiJ9.service-account-token")
    repo = tmp_path / "mirror" / CLIP
    save_tiny_clip(repo)
    (repo / "config.json").unlink()
    (repo / "config.json").symlink_to(secret)
    cfg = load_config("configs/tiny.yaml", [f"rewards=[{{name: c, kind: clipscore, model: {CLIP}}}]"])
    with pytest.raises(CacheError, match=r"config\.json: symbolic link.*refused"):
        cache_models(cfg, tmp_path / "cache", mirror=tmp_path / "mirror")
    copied = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert not any("service-account-token" in p.read_text(errors="ignore") for p in copied)
    assert not (tmp_path / "cache" / MANIFEST).exists()


def test_a_symlink_planted_in_a_cached_snapshot_is_refused(tmp_path, mirror):
    cfg = load_config("configs/tiny.yaml", [f"rewards=[{{name: c, kind: clipscore, model: {CLIP}}}]"])
    cache = tmp_path / "cache"
    cache_models(cfg, cache, mirror=mirror)
    (entry,) = read_manifest(cache)["artifacts"]
    target = cache / entry["path"] / "config.json"
    moved = tmp_path / "elsewhere.json"
    target.rename(moved)
    target.symlink_to(moved)  # same bytes, same size: only the link gives it away
    with pytest.raises(CacheError, match="symbolic link"):
        build_reward(cfg.rewards[0]).setup("cpu", Hub(cache_dir=cache))


def _ckpt(step: int) -> Checkpoint:
    w = torch.full((4, 4), float(step))
    return Checkpoint(
        state={"step": step, "epoch": step}, adapters={n: {"w": w} for n in ("trainable", "old", "ema")}
    )


def test_symlinked_checkpoints_are_refused(tmp_path, caplog):
    other = CheckpointManager(tmp_path / "other-run", keep_last=5, compat={"k": 1})
    planted = other.save(_ckpt(9))
    run = tmp_path / "run"
    mgr = CheckpointManager(run, keep_last=5, compat={"k": 1})
    mgr.save(_ckpt(2))
    (run / "step-00000009").symlink_to(planted, target_is_directory=True)
    assert mgr.resolve("latest") == run / "step-00000002"  # the link is skipped, with a warning
    assert "symbolic link" in caplog.text
    with pytest.raises(CheckpointError, match="symbolic link"):
        mgr.resolve(str(run / "step-00000009"))
    state = run / "step-00000002" / "state.json"
    state.rename(tmp_path / "state.json")
    state.symlink_to(tmp_path / "state.json")
    with pytest.raises(CheckpointError, match=r"state\.json: a symbolic link"):
        mgr.resolve(str(run / "step-00000002"))


# ----------------------------------------------------------------------------------- the manifest
def test_a_manifest_changed_after_the_run_recorded_it_is_refused(tmp_path, mirror):
    cfg = load_config("configs/tiny.yaml", [f"rewards=[{{name: c, kind: clipscore, model: {CLIP}}}]"])
    cache = tmp_path / "cache"
    recorded = file_sha256(cache_models(cfg, cache, mirror=mirror))
    hub = run_hub(cfg, cache_dir=cache, manifest_sha256=recorded)
    manifest = read_manifest(cache)
    manifest["artifacts"][0]["files"][0]["sha256"] = "0" * 64  # rewritten on the volume
    (cache / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=f"differs from the {recorded} this run recorded"):
        run_hub(cfg, cache_dir=cache, manifest_sha256=recorded)
    with pytest.raises(CacheError, match="this run recorded"):  # also when it changes mid-run
        build_reward(cfg.rewards[0]).setup("cpu", hub)


# ----------------------------------------------------------------------------------- shadowing
def test_a_local_directory_named_like_the_hub_id_does_not_shadow_the_cache(
    tmp_path, mirror, monkeypatch, images
):
    cfg = load_config("configs/tiny.yaml", [f"rewards=[{{name: c, kind: clipscore, model: {CLIP}}}]"])
    cache = tmp_path / "cache"
    cache_models(cfg, cache, mirror=mirror)
    work = tmp_path / "work"
    save_tiny_clip(work / CLIP, seed=123)  # ./marble-tests/tiny-clip: other weights
    monkeypatch.chdir(work)
    reward = build_reward(cfg.rewards[0])
    reward.setup("cpu", Hub(cache_dir=cache))
    cached = reward(images, PROMPTS, None).scores
    verified = build_reward(ClipScoreReward(name="c", model=str(mirror / CLIP)))(images, PROMPTS, None).scores
    shadow = build_reward(ClipScoreReward(name="c", model=str(work / CLIP)))(images, PROMPTS, None).scores
    torch.testing.assert_close(cached, verified)
    assert not torch.allclose(cached, shadow)
    assert Path(os.getcwd()) == work
