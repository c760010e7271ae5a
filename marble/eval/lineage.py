"""Lineage of an evaluation: which code, config, data, adapter and reward models produced the numbers.

Recorded in `eval.json` by the evaluate stage and copied into registry tags by the register stage,
so a registered adapter can be traced back to everything that made it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from marble.config import MarbleConfig
from marble.eval.contract import (
    ArtifactRef,
    CachedArtifact,
    CacheSummary,
    Lineage,
    RewardLineage,
    RewardModelsLineage,
)
from marble.hub import Hub
from marble.io import file_sha256
from marble.registry.base import adapter_sha256

log = logging.getLogger(__name__)

GIT_COMMIT_ENV = "MARBLE_GIT_COMMIT"
"""Set by container builds that carry no .git directory (the image's commit)."""


def git_commit() -> str:
    """The commit of the marble source tree ('+dirty' if it has local changes), or 'unknown'."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=src, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def data_lineage(prompts_dir: Path) -> dict[str, str | None]:
    """Hashes of the prepared prompts: the manifest's data hash and the evaluated test split's sha256."""
    manifest = prompts_dir / "manifest.json"
    test = prompts_dir / "test.jsonl"
    data_hash = None
    if manifest.is_file():
        try:
            data_hash = json.loads(manifest.read_text(encoding="utf-8")).get("data_hash")
        except (ValueError, AttributeError):
            log.warning("%s is not a JSON object; using its file hash as the data hash", manifest)
        data_hash = data_hash or file_sha256(manifest)
    return {
        "data_hash": data_hash,
        "prompts_manifest_sha256": file_sha256(manifest) if manifest.is_file() else None,
        "test_jsonl_sha256": file_sha256(test) if test.is_file() else None,
    }


def reward_lineage(cfg: MarbleConfig, hub: Hub | None) -> RewardModelsLineage:
    """Every reward's model repos and pinned revisions (the artifacts its class declares, the same list
    `marble cache-rewards` snapshots), the model lock's hash, and the reward cache manifest (hash and
    resolved revisions)."""
    from marble.rewards.registry import reward_class

    rewards = {
        spec.name: RewardLineage(
            kind=spec.kind,
            held_out=spec.held_out,
            artifacts=[
                ArtifactRef(id=a.id, revision=a.revision) for a in reward_class(spec.kind).artifacts(spec)
            ],
        )
        for spec in cfg.rewards
    }
    lock = hub.lock.sha256 if hub is not None and hub.lock is not None else None
    out = RewardModelsLineage(rewards=rewards, model_lock_sha256=lock)
    reward_cache = hub.cache_dir if hub is not None else None
    if reward_cache is None:
        return out
    path = Path(reward_cache) / "manifest.json"
    if not path.is_file():
        log.warning("reward cache %s has no manifest.json; reward hashes not recorded", reward_cache)
        return out
    out.manifest_sha256 = file_sha256(path)
    try:
        out.manifest = _manifest_summary(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, AttributeError, TypeError):
        log.warning("%s is not a reward cache manifest; only its hash is recorded", path)
    return out


def _manifest_summary(manifest: dict[str, Any]) -> CacheSummary:
    """The reward cache manifest without its per-file lists: each snapshot's id, the revision it
    resolved to (an unpinned config is pinned there), who uses it, and its size."""
    keep = ("id", "requested_revision", "revision", "source", "used_by", "total_bytes")
    return CacheSummary(
        format=manifest.get("format"),
        created_utc=manifest.get("created_utc"),
        artifacts=[
            CachedArtifact(**{k: a[k] for k in keep if k in a}, num_files=len(a.get("files", [])))
            for a in manifest.get("artifacts", [])
        ],
    )


def eval_protocol_hash(cfg: MarbleConfig, data: dict[str, Any]) -> str:
    """Identity of HOW an adapter was measured: base model, held-out data, sampling settings, seeds
    and reward definitions (not the adapter, the training or the gate). Two evaluations are comparable
    (for the champion Pareto check) only when this matches."""
    e = cfg.eval
    blob = {
        "base": [cfg.model.pretrained, cfg.model.revision, cfg.model.dtype, cfg.model.max_sequence_length],
        "data": [data.get("data_hash"), data.get("test_jsonl_sha256")],
        "eval": [
            e.num_steps,
            e.guidance_scale,
            cfg.eval_resolution,
            e.num_prompts,
            e.images_per_prompt,
            e.seed,
        ],
        "rewards": [r.model_dump(mode="json", exclude={"batch_size", "device"}) for r in cfg.rewards],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def collect_lineage(cfg: MarbleConfig, prompts_dir: Path, adapter_dir: Path, hub: Hub | None) -> Lineage:
    """Everything `eval.json["lineage"]` records."""
    data = data_lineage(prompts_dir)
    return Lineage(
        eval_protocol=eval_protocol_hash(cfg, data),
        run_name=cfg.run_name,
        git_commit=git_commit(),
        config_hash=cfg.config_hash(),
        base_model=cfg.model.pretrained,
        base_model_revision=cfg.model.revision,
        adapter_dir=str(adapter_dir),
        adapter_sha256=adapter_sha256(adapter_dir),
        **data,
        reward_models=reward_lineage(cfg, hub),
    )
