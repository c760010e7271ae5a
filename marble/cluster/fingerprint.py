"""Fingerprints of a run's inputs that the config alone does not pin, so KFP's cache sees them.

KFP caches a task by its component and input values. The config names prompt files and models but not
their contents: an edited prompt file (or a new DVC revision) and an unpinned hub model that moved
would leave `prepare-prompts` and `cache-reward-models` hitting stale cache entries. The pipeline's
uncached `fingerprint-inputs` task computes these fingerprints and passes them to both as inputs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def _digest(parts: list[Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def data_fingerprint(cfg: Any) -> str:
    """sha256 over every prompt source's bytes (read where prepare reads them) and generator settings."""
    from marble.data.sources import load_source

    parts: list[Any] = []
    for i, src in enumerate(cfg.data.sources):
        path = getattr(src, "path", None)
        if path is None:  # generated sources (tiny world) are pinned by their settings
            parts.append(src.model_dump(mode="json"))
            continue
        where, data = load_source(path, cfg.data, f"data.sources.{i}.path")
        parts.append([src.model_dump(mode="json"), str(where), hashlib.sha256(data).hexdigest()])
    return _digest(parts)


def _local_listing(root: Path) -> list[Any]:
    return sorted(
        [str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns]
        for p in root.rglob("*")
        if p.is_file()
    )


def models_fingerprint(cfg: Any) -> str:
    """Every model artifact at the revision it resolves to today (hub commit, or a local listing)."""
    from marble.model_cache import required_artifacts

    parts: list[Any] = [cfg.model.model_dump(mode="json")]
    for art, _ in required_artifacts(cfg):
        local = Path(art.id).expanduser()
        if local.is_dir():
            parts.append([art.id, _local_listing(local)])
        elif art.revision:
            parts.append([art.id, art.revision])
        else:
            parts.append([art.id, _hub_commit(art.id)])
    return _digest(parts)


def _hub_commit(repo_id: str) -> str:
    """The commit an unpinned hub repo is at now (HF_TOKEN from the environment for gated repos)."""
    from huggingface_hub import HfApi

    from marble.errors import CacheError

    try:
        return HfApi().model_info(repo_id).sha
    except Exception as exc:  # network, auth, missing repo: the message says which
        raise CacheError(
            f"cannot resolve the current revision of {repo_id!r} on the hub ({type(exc).__name__}: {exc}); "
            "pin it (its `revision` field) or give the task network access and, for gated models, "
            "pipeline.hub_token_secret"
        ) from None
