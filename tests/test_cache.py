"""The reward cache: manifest, idempotence, tamper/partial detection, rewards loading through the cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _tiny_reward_models import save_tiny_aesthetic_head, save_tiny_clip

from marble.config import ClipScoreReward
from marble.configio import load_config
from marble.errors import CacheError
from marble.hub import Hub
from marble.hub.snapshots import MANIFEST, cached_snapshot, read_manifest
from marble.io import file_sha256
from marble.model_cache import cache_models
from marble.rewards import build_reward
from marble.rewards.check import check_rewards

HUB_ID = "marble-tests/tiny-clip"
HEAD_ID = "marble-tests/tiny-aesthetic"
PROMPTS = ["a red circle", "a ring"]
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A local mirror laid out like the hub: <mirror>/<org>/<name>/ (plus a file the patterns skip)."""
    root = tmp_path_factory.mktemp("mirror")
    save_tiny_clip(root / HUB_ID)
    (root / HUB_ID / "flax_model.msgpack").write_bytes(b"not cached")
    save_tiny_aesthetic_head(root / HEAD_ID, embed_dim=16, fmt="safetensors")
    return root


def model_config(**extra):
    rewards = [
        f"{{name: clipscore, kind: clipscore, model: {HUB_ID}, revision: '{REV}'}}",
        f"{{name: aesthetic, kind: aesthetic, model: {HUB_ID}, revision: '{REV}', head: {HEAD_ID}, "
        "head_file: head.safetensors, held_out: true}",
        "{name: brightness, kind: brightness}",
    ]
    return load_config("configs/tiny.yaml", [f"rewards=[{', '.join(rewards)}]"])


def test_tiny_config_writes_a_manifest_that_says_offline(tmp_path):
    cfg = load_config("configs/tiny.yaml")
    path = cache_models(cfg, tmp_path / "cache")
    manifest = json.loads(path.read_text())
    assert manifest["artifacts"] == [] and "offline" in manifest["note"] and "tiny" in manifest["note"]
    assert manifest["offline_rewards"] == [r.name for r in cfg.rewards]
    before = path.stat().st_mtime_ns
    assert cache_models(cfg, tmp_path / "cache") == path and path.stat().st_mtime_ns == before


def test_snapshot_from_mirror_verify_and_idempotent(tmp_path, mirror, monkeypatch):
    cfg = model_config()
    out = tmp_path / "cache"
    path = cache_models(cfg, out, mirror=mirror)
    manifest = read_manifest(out)
    ids = sorted((e["id"], tuple(e["used_by"])) for e in manifest["artifacts"])
    assert ids == [(HEAD_ID, ("aesthetic",)), (HUB_ID, ("clipscore", "aesthetic"))]  # CLIP cached once
    clip = next(e for e in manifest["artifacts"] if e["id"] == HUB_ID)
    names = {f["path"] for f in clip["files"]}
    assert "model.safetensors" in names and "flax_model.msgpack" not in names
    rec = next(f for f in clip["files"] if f["path"] == "model.safetensors")
    snap = out / clip["path"]
    assert rec["sha256"] == file_sha256(snap / "model.safetensors") and rec["size"] > 0
    assert clip["revision"] == REV and clip["source"].startswith("mirror:")
    # second run: verifies, fetches nothing, rewrites nothing
    monkeypatch.setattr(
        "marble.model_cache.snapshot", lambda *a, **k: pytest.fail("second run must not fetch")
    )
    before = path.stat().st_mtime_ns
    assert cache_models(cfg, out, mirror=mirror) == path and path.stat().st_mtime_ns == before


def test_rewards_load_through_the_cache_offline(tmp_path, mirror, monkeypatch):
    cfg = model_config()
    out = tmp_path / "cache"
    cache_models(cfg, out, mirror=mirror)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    direct = build_reward(ClipScoreReward(name="c", model=str(mirror / HUB_ID)))(images, PROMPTS, None).scores
    for spec in cfg.rewards[:2]:
        r = build_reward(spec)
        r.setup("cpu", Hub(cache_dir=out))
        scores = r(images, PROMPTS, None).scores
        assert torch.isfinite(scores).all()
        if spec.kind == "clipscore":
            torch.testing.assert_close(scores, direct)  # same weights as the mirror
    report = check_rewards(cfg, Hub(cache_dir=out))  # the health check loads through the cache too
    assert all(name in report for name in ("clipscore", "aesthetic", "brightness"))
    with pytest.raises(CacheError, match="no snapshot of 'other/model'"):
        cached_snapshot(out, "other/model", None)


def test_tampered_partial_and_extra_files_are_named(tmp_path, mirror):
    cfg = model_config()
    out = tmp_path / "cache"
    cache_models(cfg, out, mirror=mirror)
    clip = next(e for e in read_manifest(out)["artifacts"] if e["id"] == HUB_ID)
    weights = out / clip["path"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    weights.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="model.safetensors.*sha256"):
        cache_models(cfg, out, mirror=mirror)
    with pytest.raises(CacheError, match="model.safetensors"):
        build_reward(cfg.rewards[0]).setup("cpu", Hub(cache_dir=out))
    weights.unlink()
    with pytest.raises(CacheError, match="model.safetensors.*partial"):
        cache_models(cfg, out, mirror=mirror)
    shutil.copy(mirror / HUB_ID / "model.safetensors", weights)  # repaired
    (out / clip["path"] / "evil.py").write_text("import os")
    with pytest.raises(CacheError, match="evil.py.*not in the manifest"):
        cache_models(cfg, out, mirror=mirror)


def test_unreachable_hub_is_a_cache_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MARBLE_HUB_MIRROR", raising=False)
    cfg = load_config("configs/tiny.yaml", ["rewards=[{name: c, kind: clipscore, model: nobody/nothing}]"])
    with pytest.raises(CacheError, match="nobody/nothing"):
        cache_models(cfg, tmp_path / "cache")
    assert not (tmp_path / "cache" / MANIFEST).exists()
    assert not any((tmp_path / "cache" / "snapshots").glob(".partial-*"))


def test_size_only_verification_mode(tmp_path, mirror, monkeypatch):
    cfg = model_config()
    out = tmp_path / "cache"
    cache_models(cfg, out, mirror=mirror)
    clip = next(e for e in read_manifest(out)["artifacts"] if e["id"] == HUB_ID)
    weights = out / clip["path"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setenv("MARBLE_CACHE_VERIFY", "size")
    assert cached_snapshot(out, HUB_ID, REV)[0] == out / clip["path"]  # same size: passes the quick check
    weights.write_bytes(bytes(data[:-1]))
    monkeypatch.setattr("marble.hub.snapshots._VERIFIED", {})  # verification is memoised per process
    with pytest.raises(CacheError, match="model.safetensors: size"):
        cached_snapshot(out, HUB_ID, REV)
    monkeypatch.setenv("MARBLE_CACHE_VERIFY", "nope")
    with pytest.raises(CacheError, match="MARBLE_CACHE_VERIFY"):
        cached_snapshot(out, HUB_ID, REV)


def test_a_new_reward_adds_its_snapshot_and_keeps_the_others(tmp_path, mirror, monkeypatch):
    out = tmp_path / "cache"
    only_clip = load_config(
        "configs/tiny.yaml", [f"rewards=[{{name: c, kind: clipscore, model: {HUB_ID}, revision: '{REV}'}}]"]
    )
    cache_models(only_clip, out, mirror=mirror)
    (first,) = read_manifest(out)["artifacts"]
    fetched = []
    real_download = __import__("marble.hub.snapshots", fromlist=["_download"])._download
    monkeypatch.setattr(
        "marble.hub.snapshots._download", lambda art, *a: fetched.append(art.id) or real_download(art, *a)
    )
    cache_models(model_config(), out, mirror=mirror)
    entries = read_manifest(out)["artifacts"]
    assert fetched == [HEAD_ID] and entries[0] == first and [e["id"] for e in entries] == [HUB_ID, HEAD_ID]
