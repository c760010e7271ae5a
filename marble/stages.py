"""The five stages of a marble run, one function each.

The CLI (`marble <stage>`), `dvc.yaml` (which calls the CLI) and the Kubeflow components all call
these functions, so every way of running marble executes the same code. Each function takes the
validated config and explicit directories, and returns the path of its main output.

Stages that load models take the run's model settings: `reward_cache` (the `cache-rewards` output),
`lock` (the model lock, `marble lock`) and `reward_cache_sha256` (the cache manifest's sha256 as the
cache stage reported it: a manifest that changed on the volume since is refused). A storage failure
anywhere in a stage (disk full, quota, read-only volume) is one `StorageError` naming the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marble.config import MarbleConfig
from marble.hub.lock import ModelLock
from marble.io import storage_errors


def prepare_prompts(cfg: MarbleConfig, out_dir: str | Path) -> Path:
    """Read, validate, mix and split the prompt sources into `out_dir` (train/test JSONL + manifest).

    Returns the manifest path. Nothing is left in `out_dir` on error.
    """
    from marble.data.prepare import prepare_prompts as _impl

    with storage_errors(out_dir):
        return _impl(cfg, Path(out_dir))


def cache_reward_models(
    cfg: MarbleConfig,
    out_dir: str | Path,
    *,
    lock: ModelLock | None = None,
    write_lock: str | Path | None = None,
    config_name: str | None = None,
) -> Path:
    """Snapshot every reward model (and the base model) into `out_dir` with a verified manifest, at the
    locked revisions when a lock is given (refusing files that differ from it). `write_lock`: a lock
    file to write (or complete) from what was cached, so a first run pins what it downloaded.

    Returns the manifest path. A second call verifies and does nothing.
    """
    from marble.model_cache import cache_models, lock_models

    with storage_errors(out_dir):
        if write_lock is not None:
            lock_models(cfg, Path(write_lock), Path(out_dir), config_name=config_name)
            return Path(out_dir) / "manifest.json"
        return cache_models(cfg, Path(out_dir), lock=lock)


def train(
    cfg: MarbleConfig,
    prompts_dir: str | Path,
    out_dir: str | Path,
    *,
    reward_cache: str | Path | None = None,
    lock: ModelLock | None = None,
    reward_cache_sha256: str | None = None,
) -> Path:
    """Run MARBLE training; returns the exported adapter directory (`out_dir/adapter`)."""
    from marble.model_cache import run_hub
    from marble.train.trainer import run_training

    hub = run_hub(cfg, cache_dir=reward_cache, lock=lock, manifest_sha256=reward_cache_sha256)
    with storage_errors(out_dir):
        return run_training(cfg, Path(prompts_dir), Path(out_dir), hub=hub)


def evaluate(
    cfg: MarbleConfig,
    prompts_dir: str | Path,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    reward_cache: str | Path | None = None,
    lock: ModelLock | None = None,
    reward_cache_sha256: str | None = None,
    train_dir: str | Path | None = None,
) -> Path:
    """Score base vs. adapter on held-out prompts; writes report + metrics.json, returns metrics.json."""
    from marble.eval.evaluate import run_evaluation
    from marble.model_cache import run_hub

    hub = run_hub(cfg, cache_dir=reward_cache, lock=lock, manifest_sha256=reward_cache_sha256)
    with storage_errors(out_dir):
        return run_evaluation(
            cfg,
            Path(prompts_dir),
            Path(adapter_dir),
            Path(out_dir),
            hub=hub,
            train_dir=Path(train_dir) if train_dir else None,
        )


@dataclass(frozen=True)
class Promotion:
    """An evaluated adapter on its way to the registry: what the gate and the registration both read.

    `registry_dir` is where an embedded MLflow store lives (no `registry.tracking_uri`); the pipeline
    points it at the cache PVC so `champion` carries over from one scheduled run to the next. None: the
    gate reads a run-local store (which has no champion yet) and the registration keeps its store in
    its `out_dir`.
    """

    cfg: MarbleConfig
    adapter_dir: str | Path
    eval_dir: str | Path
    registry_dir: str | Path | None = None


def register_adapter(promotion: Promotion, out_dir: str | Path) -> dict[str, Any]:
    """Register the adapter in the model registry; move `champion` only if the gate passes.

    Returns the registration record (also written to `out_dir/registration.json`).
    """
    from marble.registry.register import register_adapter as _impl

    p = promotion
    with storage_errors(out_dir):
        return _impl(p.cfg, Path(p.adapter_dir), Path(p.eval_dir), Path(out_dir), registry_dir=p.registry_dir)


def gate(promotion: Promotion, out_dir: str | Path) -> dict[str, Any]:
    """Apply the promotion gate against the registry's champion, registering nothing.

    Returns the decision ('champion' or 'candidate', with every check), also written to
    `out_dir/gate.json`. `register_adapter` decides again under the registry's lock.
    """
    import json

    from marble.io import atomic_write_text
    from marble.registry.promotion import GATE_FILE, decide_promotion

    p = promotion
    registry_dir = Path(p.registry_dir) if p.registry_dir else None
    with storage_errors(out_dir):
        decision = decide_promotion(p.cfg, Path(p.adapter_dir), Path(p.eval_dir), registry_dir)
        atomic_write_text(Path(out_dir) / GATE_FILE, json.dumps(decision, indent=2, sort_keys=True) + "\n")
    return decision
