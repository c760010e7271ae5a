"""Default locations of each stage's outputs when run from the CLI or DVC."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from marble.config import MarbleConfig


class StageDirs(NamedTuple):
    prompts: Path
    reward_cache: Path
    train: Path
    eval: Path
    registry: Path


def stage_dirs(cfg: MarbleConfig) -> StageDirs:
    root = Path(cfg.output_dir) / cfg.run_name
    return StageDirs(
        prompts=root / "prompts",
        reward_cache=root / "reward-cache",
        train=root / "train",
        eval=root / "eval",
        registry=root / "registry",
    )
