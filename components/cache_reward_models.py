"""Component for stage 2: snapshot the reward models and base model (`marble.stages.cache_reward_models`).

On a cluster the snapshots go to the cache PVC (`work_root`), where a later run finds them verified and
downloads nothing; the `reward_cache` artifact then holds a copy of the manifest for lineage. With an
empty `work_root` (the local run) the snapshots live in the artifact itself.

With a model lock (`model_lock`), snapshots are taken at the locked revisions and refused when a file
differs. Without one, the lock of what was downloaded is written into the artifact (`model.lock.yaml`):
commit it beside the config to pin the next runs. `manifest_sha256` is the run's record of the cache
manifest: train and evaluate refuse a manifest that changed on the volume since.
"""

from typing import NamedTuple

from kfp.dsl import Artifact, Output

from components._factory import make_component


def cache_reward_models(
    config: dict,
    model_lock: dict,
    model_lock_sha256: str,
    work_root: str,
    models_fingerprint: str,
    reward_cache: Output[Artifact],
) -> NamedTuple("Outputs", [("cache_dir", str), ("manifest_sha256", str)]):
    """Returns the directory that train and evaluate read the snapshots from, and its manifest's sha256.
    `models_fingerprint` (the models' resolved revisions) is an input only so that KFP's cache key
    changes with the models."""
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from marble import stages
    from marble.config import MarbleConfig
    from marble.io import file_sha256
    from marble.model_cache import lock_from_parameters

    cfg = MarbleConfig.model_validate(config)
    lock = lock_from_parameters(model_lock, model_lock_sha256)
    cache_dir = Path(work_root) / "reward-cache" if work_root else Path(reward_cache.path)
    Path(reward_cache.path).mkdir(parents=True, exist_ok=True)
    first_run = {"write_lock": Path(reward_cache.path) / "model.lock.yaml"} if lock is None else {}
    manifest = Path(stages.cache_reward_models(cfg, cache_dir, lock=lock, **first_run))
    if work_root:
        shutil.copyfile(manifest, Path(reward_cache.path) / manifest.name)
    digest = file_sha256(manifest)
    reward_cache.metadata["cache_dir"] = str(cache_dir)
    reward_cache.metadata["config_hash"] = cfg.config_hash()
    reward_cache.metadata["models_fingerprint"] = models_fingerprint
    reward_cache.metadata["manifest_sha256"] = digest
    reward_cache.metadata["model_lock_sha256"] = model_lock_sha256
    return namedtuple("Outputs", ["cache_dir", "manifest_sha256"])(str(cache_dir), digest)


def build(containerized: bool = False):
    return make_component(cache_reward_models, role="cpu", containerized=containerized)


component = build()
