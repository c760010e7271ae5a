"""Checks of a config before it is sent to a cluster, for what only fails there."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any


def repo_relative_sources(cfg: Any) -> list[str]:
    """Prompt sources a pod cannot read: relative paths (the repository's working tree is not in the
    image) with neither `data.root` (e.g. the cache PVC) nor `data.dvc` to resolve them."""
    if cfg.data.dvc is not None or cfg.data.root:
        return []
    return [
        f"data.sources.{i}.path={src.path!r}"
        for i, src in enumerate(cfg.data.sources)
        if getattr(src, "path", None) and not PurePosixPath(src.path).is_absolute()
    ]


def cluster_problems(cfg: Any) -> list[str]:
    problems = []
    relative = repo_relative_sources(cfg)
    if relative:
        problems.append(
            f"{', '.join(relative)}: relative to the repository, which is not in the image; set data.root "
            f"to where the files are on the cache PVC (e.g. {cfg.pipeline.cache_mount}/data) or data.dvc to "
            "read them from the DVC remote"
        )
    if cfg.reward_token_envs and not cfg.pipeline.reward_token_secret:
        problems.append(
            f"http rewards read their token from {', '.join(cfg.reward_token_envs)} (token_env) but "
            "pipeline.reward_token_secret is null: name the Kubernetes secret holding those keys"
        )
    return problems
