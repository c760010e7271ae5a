"""Lineage recorded by the evaluation: data hash, reward revisions, adapter hash, code version."""

from __future__ import annotations

import json
from pathlib import Path

from marble.configio import load_config
from marble.eval.lineage import collect_lineage, git_commit
from marble.hub import Hub

REPO = Path(__file__).resolve().parents[1]


def test_lineage_records_data_rewards_adapter_and_code(tmp_path, monkeypatch):
    cfg = load_config(REPO / "configs/tiny.yaml")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "test.jsonl").write_text('{"id": "x"}\n')
    (prompts / "manifest.json").write_text(json.dumps({"data_hash": "d1a2b3", "files": {}}))
    cache = tmp_path / "cache"
    cache.mkdir()
    files = [{"path": f"f{i}", "size": 1, "sha256": "0" * 64} for i in range(3)]
    art = {
        "id": "org/reward",
        "requested_revision": None,
        "revision": "abc123",
        "used_by": ["r"],
        "files": files,
    }
    (cache / "manifest.json").write_text(json.dumps({"format": "marble-reward-cache/1", "artifacts": [art]}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"w")

    lin = collect_lineage(cfg, prompts, adapter, Hub(cache_dir=cache)).model_dump(mode="json")
    assert lin["data_hash"] == "d1a2b3" and len(lin["test_jsonl_sha256"]) == 64
    assert lin["config_hash"] == cfg.config_hash() and len(lin["adapter_sha256"]) == 64
    rm = lin["reward_models"]
    assert set(rm["rewards"]) == {r.name for r in cfg.rewards} and rm["rewards"]["jpeg"]["held_out"]
    assert len(rm["manifest_sha256"]) == 64
    # the unpinned reward is recorded at the revision the cache resolved it to; file lists are dropped
    assert rm["manifest"]["artifacts"] == [
        {"id": "org/reward", "requested_revision": None, "revision": "abc123", "source": None, "used_by": ["r"],
         "total_bytes": None, "num_files": 3}
    ]  # fmt: skip
    # an adapter's identity changes with its bytes
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"v")
    assert collect_lineage(cfg, prompts, adapter, None).adapter_sha256 != lin["adapter_sha256"]


def test_git_commit_prefers_the_build_variable(monkeypatch):
    monkeypatch.setenv("MARBLE_GIT_COMMIT", "deadbeef")
    assert git_commit() == "deadbeef"
    monkeypatch.delenv("MARBLE_GIT_COMMIT")
    commit = git_commit()
    assert commit == "unknown" or len(commit.split("+")[0]) == 40
