"""The model lock against a local hub mirror of the paper config (tiny models of the real classes).

Lock, load, tamper and be refused with both hashes named, add a model, update, check; every model a
reward loads is in the lock; an unpinned hub repo stays at its locked commit when the hub moves on.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from _eval_helpers import reward as reward_result
from _eval_helpers import scores, summary
from _hub_mirror import PAPER_REPOS, build_paper_mirror, fake_open_clip

from marble.cli import main
from marble.configio import load_config
from marble.errors import LockError
from marble.hub import Hub
from marble.hub.lock import lock_path_for, read_lock
from marble.hub.snapshots import MANIFEST, read_manifest
from marble.io import file_sha256
from marble.model_cache import cache_models, check_lock, lock_models, run_hub
from marble.models.loading import resolve_pretrained
from marble.rewards import build_rewards
from marble.rewards.registry import REWARD_KINDS, reward_class

pytestmark = pytest.mark.tiny_model  # loads the built tiny model (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory, tiny_config):
    tiny_sd3 = Path(resolve_pretrained(tiny_config.model)[0])
    return build_paper_mirror(tmp_path_factory.mktemp("hub-mirror"), tiny_sd3)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, mirror):
    monkeypatch.setenv("MARBLE_HUB_MIRROR", str(mirror))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "open_clip", fake_open_clip())


@pytest.fixture
def config_path(tmp_path):
    """configs/sd35m-marble.yaml as a user's copy (the lock goes beside it)."""
    path = tmp_path / "configs" / "sd35m-marble.yaml"
    path.parent.mkdir()
    shutil.copy(REPO / "configs" / "sd35m-marble.yaml", path)
    return path


@pytest.fixture
def locked(config_path, tmp_path):
    cfg = load_config(config_path)
    cache = tmp_path / "cache"
    lock, changed = lock_models(cfg, lock_path_for(config_path), cache, config_name=config_path.name)
    assert changed
    return cfg, cache, lock


class RecordingHub(Hub):
    """The run's Hub, also recording every model repo a loader asks it for."""

    asked: list

    def locate(self, model, revision):
        self.asked.append(model)
        return super().locate(model, revision)


def test_lock_lists_every_repo_with_revision_and_file_hashes(locked, config_path):
    cfg, cache, lock = locked
    path = config_path.with_name("sd35m-marble.lock.yaml")
    assert path.is_file() and read_lock(path) == lock
    assert sorted(lock.models) == sorted(PAPER_REPOS)
    assert lock.models["openai/clip-vit-large-patch14"].used_by == ["geneval", "clipscore", "aesthetic"]
    assert lock.models["google-bert/bert-base-uncased"].used_by == ["imagereward"]  # the tokenizer too
    hps = lock.models["xswu/HPSv2"]
    assert list(hps.files) == ["HPS_v2.1_compressed.pt"] and hps.source == "mirror"
    entry = next(e for e in read_manifest(cache)["artifacts"] if e["id"] == "xswu/HPSv2")
    (rec,) = entry["files"]  # the pickle was converted once, at cache time; only safetensors is kept
    assert rec["path"] == "HPS_v2.1_compressed.safetensors"
    assert rec["converted_from"]["sha256"] == hps.files["HPS_v2.1_compressed.pt"].sha256
    assert read_manifest(cache)["model_lock_sha256"] == lock.sha256
    text = path.read_text()
    assert text.startswith("# marble model lock") and str(cache) not in text  # no machine paths


def test_every_model_a_reward_loads_is_in_the_lock(locked):
    cfg, cache, lock = locked
    weighted = {k for k in REWARD_KINDS if getattr(reward_class(k), "requires_weights", False)}
    assert weighted <= {s.kind for s in cfg.rewards}, "add the new reward kind to the paper mirror"
    hub = RecordingHub(cache_dir=cache, offline=True, lock=lock)
    hub.asked = []
    resolve_pretrained(cfg.model, hub)
    for reward in build_rewards(cfg.rewards):
        reward.setup("cpu", hub)
    assert set(hub.asked) == set(lock.models)  # everything loaded is locked, everything locked is loaded


def test_weights_that_differ_from_the_lock_are_refused_naming_both_hashes(locked, mirror, tmp_path):
    cfg, cache, lock = locked
    entry = next(e for e in read_manifest(cache)["artifacts"] if e["id"] == "openai/clip-vit-large-patch14")
    weights = cache / entry["path"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    rec = next(f for f in entry["files"] if f["path"] == "model.safetensors")
    locked_sha, new_sha = rec["sha256"], file_sha256(weights)
    rec["sha256"] = new_sha  # whoever changed the file on the volume rewrote the manifest too
    manifest = read_manifest(cache)
    manifest["artifacts"] = [entry if e["id"] == entry["id"] else e for e in manifest["artifacts"]]
    (cache / MANIFEST).write_text(json.dumps(manifest))
    hub = run_hub(cfg, cache_dir=cache, lock=lock)
    reward = build_rewards([s for s in cfg.rewards if s.name == "clipscore"])[0]
    with pytest.raises(LockError) as err:
        reward.setup("cpu", hub)
    msg = str(err.value)
    assert "openai/clip-vit-large-patch14" in msg and "model.safetensors" in msg
    assert new_sha in msg and locked_sha in msg
    # a fresh cache from a mirror whose file changed is refused before anything is published
    shutil.copy(weights, mirror / "openai/clip-vit-large-patch14" / "changed.safetensors")
    try:
        with pytest.raises(LockError, match=r"changed\.safetensors.*not in the lock"):
            cache_models(cfg, tmp_path / "fresh", lock=lock)
    finally:
        (mirror / "openai/clip-vit-large-patch14" / "changed.safetensors").unlink()
    assert not (tmp_path / "fresh" / MANIFEST).exists()
    assert not [p for p in (tmp_path / "fresh" / "snapshots").iterdir() if "clip-vit-large" in p.name]


def test_a_local_directory_is_checked_against_the_lock_too(tmp_path, mirror):
    local = tmp_path / "my-clip"
    shutil.copytree(mirror / "openai/clip-vit-large-patch14", local)
    cfg = load_config("configs/tiny.yaml", [f"rewards=[{{name: c, kind: clipscore, model: {local}}}]"])
    lock, _ = lock_models(cfg, tmp_path / "tiny.lock.yaml", tmp_path / "cache")
    hub = run_hub(cfg, lock=lock)  # no cache: the directory itself is loaded, after the lock check
    build_rewards(cfg.rewards)[0].setup("cpu", hub)
    (local / "config.json").write_text((local / "config.json").read_text().replace("}", ' , "x": 1}', 1))
    with pytest.raises(LockError, match=r"config\.json.*sha256 [0-9a-f]{64} but the lock has [0-9a-f]{64}"):
        build_rewards(cfg.rewards)[0].setup("cpu", run_hub(cfg, lock=lock))


def test_a_model_the_lock_lacks_is_refused_until_the_lock_is_updated(locked, config_path, tmp_path):
    cfg, cache, lock = locked
    brand_new = load_config(config_path, ["rewards.3.model=openai/clip-vit-base-patch32"])
    with pytest.raises(
        LockError, match=r"clip-vit-base-patch32.*has no entry.*marble lock --config .*\.yaml"
    ):
        run_hub(brand_new, lock=lock, config_hint=str(config_path))
    more = load_config(config_path, ["rewards.3.model=laion/CLIP-ViT-H-14-laion2B-s32B-b79K"])
    # the laion repo is locked for its processor files only: loading its weights is a new use
    with pytest.raises(LockError, match=r"laion.*not locked.*marble lock --config .*sd35m-marble\.yaml"):
        run_hub(more, lock=lock, config_hint=str(config_path))
    with pytest.raises(LockError, match="laion"):
        cache_models(more, cache, lock=lock)
    before = config_path.with_name("sd35m-marble.lock.yaml").read_text()
    new, changed = lock_models(more, lock_path_for(config_path), cache, config_name=config_path.name)
    assert changed and set(new.models) == set(lock.models)
    laion = new.models["laion/CLIP-ViT-H-14-laion2B-s32B-b79K"]
    assert "model.safetensors" in laion.files and "model.safetensors" not in lock.models[laion_id()].files
    assert {k: v for k, v in new.models.items() if k != laion_id()} == {
        k: v.model_copy(update={"used_by": new.models[k].used_by})
        for k, v in lock.models.items()
        if k != laion_id()
    }  # the other pins are kept
    run_hub(more, lock=new)
    assert before != config_path.with_name("sd35m-marble.lock.yaml").read_text()


def laion_id() -> str:
    return "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def test_check_verifies_without_writing_and_update_re_resolves(locked, config_path, mirror, tmp_path):
    cfg, cache, lock = locked
    lock_file = config_path.with_name("sd35m-marble.lock.yaml")
    stamp = lock_file.stat().st_mtime_ns
    report = check_lock(cfg, config_path, cache)
    assert "covers the 10 model repo(s)" in report and "match the lock" in report
    assert "not in the reward cache" in check_lock(cfg, config_path, tmp_path / "no-cache")
    assert lock_file.stat().st_mtime_ns == stamp
    # new weights upstream: the lock keeps the old pin until --update
    repo = mirror / "yuvalkirstain/PickScore_v1"
    saved = tmp_path / "saved"
    shutil.copytree(repo, saved)
    try:
        from _tiny_reward_models import save_tiny_clip

        save_tiny_clip(repo, seed=99)
        with pytest.raises(LockError, match="PickScore_v1.*model.safetensors.*lock has"):
            cache_models(cfg, tmp_path / "fresh", lock=lock)
        new, changed = lock_models(
            cfg, lock_file, tmp_path / "fresh2", config_name=config_path.name, update=True
        )
        assert changed
        assert new.models["yuvalkirstain/PickScore_v1"] != lock.models["yuvalkirstain/PickScore_v1"]
        assert new.models["openai/clip-vit-large-patch14"] == lock.models["openai/clip-vit-large-patch14"]
        with pytest.raises(LockError, match="PickScore_v1.*sha256"):  # the old cache no longer matches
            check_lock(cfg, config_path, cache)
    finally:
        shutil.rmtree(repo)
        shutil.copytree(saved, repo)


def test_cli_lock_check_update_and_cache_rewards_write_lock(config_path, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["cache-rewards", "--config", str(config_path), "--out", str(cache), "--write-lock"]) == 0
    lock_file = config_path.with_name("sd35m-marble.lock.yaml")
    assert lock_file.is_file() and "model lock:" in capsys.readouterr().out
    assert main(["lock", "--config", str(config_path), "--reward-cache", str(cache)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["lock", "--config", str(config_path), "--reward-cache", str(cache), "--check"]) == 0
    data = yaml.safe_load(lock_file.read_text())
    data["models"]["xswu/HPSv2"]["files"]["HPS_v2.1_compressed.pt"]["sha256"] = "0" * 64
    lock_file.write_text(yaml.safe_dump(data))
    assert main(["lock", "--config", str(config_path), "--reward-cache", str(cache), "--check"]) == 2
    err = capsys.readouterr().err
    assert "xswu/HPSv2" in err and "HPS_v2.1_compressed.pt" in err and "0" * 64 in err


def test_cache_manifest_lineage_and_registry_record_the_lock_hash(locked, tmp_path):
    from marble.eval.lineage import reward_lineage
    from marble.registry.register import _tags

    cfg, cache, lock = locked
    hub = run_hub(cfg, cache_dir=cache, lock=lock)
    lineage = reward_lineage(cfg, hub)
    assert lineage.model_lock_sha256 == lock.sha256 == read_manifest(cache)["model_lock_sha256"]
    ev = summary(scores({"b": reward_result(0.1, (0.05, 0.15), 0.5)}, {}))
    ev.lineage.reward_models = lineage
    tags = _tags(ev, {}, "sha", "run")
    assert tags["marble.model_lock_sha256"] == lock.sha256


class FakeHfHub:
    """The huggingface_hub calls marble makes for an unpinned repo, served from local directories:
    `<root>/<repo>@<commit>/` holds each commit; `head` is the commit `main` points to. Unknown commits
    and repos fail as the hub does."""

    def __init__(self, root: Path, head: dict[str, str]):
        self.root, self.head = root, head

    def model_info(self, repo_id, *a, **k):
        if repo_id not in self.head:
            raise OSError(f"404 {repo_id}")
        return type("Info", (), {"sha": self.head[repo_id]})()

    def list_repo_files(self, repo_id, revision=None, **k):
        src = self.root / f"{repo_id}@{revision or self.head[repo_id]}"
        if not src.is_dir():
            raise OSError(f"revision {revision} of {repo_id} not found")
        return sorted(f.name for f in src.iterdir())

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, local_dir=None, **k):
        import fnmatch

        src = self.root / f"{repo_id}@{revision or self.head[repo_id]}"
        if not src.is_dir():
            raise OSError(f"revision {revision} of {repo_id} not found")
        for f in src.iterdir():
            if allow_patterns is None or any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                shutil.copy(f, Path(local_dir) / f.name)
        return local_dir


def test_an_unpinned_hub_repo_stays_at_its_locked_commit(tmp_path, monkeypatch):
    from _tiny_reward_models import save_tiny_clip

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("MARBLE_HUB_MIRROR")
    repo = "org/clip"
    save_tiny_clip(tmp_path / "hub" / f"{repo}@c1", seed=1)
    hub = FakeHfHub(tmp_path / "hub", {repo: "c1"})
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda self, r, **k: hub.model_info(r))
    monkeypatch.setattr(
        "huggingface_hub.HfApi.list_repo_files", lambda self, r, **k: hub.list_repo_files(r, **k)
    )
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub.snapshot_download)
    cfg = load_config("configs/tiny.yaml", [f"rewards=[{{name: c, kind: clipscore, model: {repo}}}]"])
    lock, _ = lock_models(cfg, tmp_path / "tiny.lock.yaml", tmp_path / "cache")
    assert lock.models[repo].revision == "c1" and lock.models[repo].source == "hub"
    save_tiny_clip(tmp_path / "hub" / f"{repo}@c2", seed=2)
    hub.head[repo] = "c2"  # the hub moved on
    cache_models(cfg, tmp_path / "cache2", lock=lock)
    (entry,) = read_manifest(tmp_path / "cache2")["artifacts"]
    assert entry["revision"] == "c1"  # the locked commit, not today's
    new, _ = lock_models(cfg, tmp_path / "tiny.lock.yaml", tmp_path / "cache3", update=True)
    assert new.models[repo].revision == "c2" and new.models[repo].files != lock.models[repo].files


def test_weights_a_library_downloads_itself_are_named_as_not_pinned(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["rewards=[{name: o, kind: ocr, backend: easyocr}]"])
    lock, _ = lock_models(cfg, tmp_path / "tiny.lock.yaml", tmp_path / "cache")
    assert lock.models == {} and lock.unpinned == ["o (ocr, backend easyocr)"]
    assert "unpinned:\n- o (ocr, backend easyocr)" in (tmp_path / "tiny.lock.yaml").read_text()
