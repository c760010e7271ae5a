"""The five stages of a marble run, one function each.

The CLI (`marble <stage>`), `dvc.yaml` (which calls the CLI) and the Kubeflow components all call
these functions, so every way of running marble executes the same code. Each function takes the
validated config and explicit directories, and returns the path of its main output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from marble.config import MarbleConfig


def prepare_prompts(cfg: MarbleConfig, out_dir: str | Path) -> Path:
    """Read, validate, mix and split the prompt sources into `out_dir` (train/test JSONL + manifest).

    Returns the manifest path. Nothing is left in `out_dir` on error.
    """
    from marble.data.prepare import prepare_prompts as _impl

    return _impl(cfg, Path(out_dir))


def cache_reward_models(cfg: MarbleConfig, out_dir: str | Path) -> Path:
    """Snapshot every reward model (and the base model) into `out_dir` with a verified manifest.

    Returns the manifest path. A second call verifies and does nothing.
    """
    from marble.rewards.cache import cache_reward_models as _impl

    return _impl(cfg, Path(out_dir))


def train(
    cfg: MarbleConfig,
    prompts_dir: str | Path,
    out_dir: str | Path,
    *,
    reward_cache: str | Path | None = None,
) -> Path:
    """Run MARBLE training; returns the exported adapter directory (`out_dir/adapter`)."""
    from marble.train.trainer import run_training

    return run_training(
        cfg, Path(prompts_dir), Path(out_dir), reward_cache=Path(reward_cache) if reward_cache else None
    )


def evaluate(
    cfg: MarbleConfig,
    prompts_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    reward_cache: str | Path | None = None,
    train_dir: str | Path | None = None,
) -> Path:
    """Score base vs. adapter on held-out prompts; writes report + metrics.json, returns metrics.json."""
    from marble.eval.evaluate import run_evaluation

    return run_evaluation(
        cfg,
        Path(prompts_dir),
        Path(adapter_dir),
        Path(out_dir),
        reward_cache=Path(reward_cache) if reward_cache else None,
        train_dir=Path(train_dir) if train_dir else None,
    )


def register_adapter(
    cfg: MarbleConfig, adapter_dir: str | Path, eval_dir: str | Path, out_dir: str | Path
) -> dict[str, Any]:
    """Register the adapter in the model registry; move `champion` only if the gate passes.

    Returns the registration record (also written to `out_dir/registration.json`).
    """
    from marble.registry.register import register_adapter as _impl

    return _impl(cfg, Path(adapter_dir), Path(eval_dir), Path(out_dir))
