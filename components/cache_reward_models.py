"""Component for stage 2: snapshot the reward models and base model (`marble.stages.cache_reward_models`).

On a cluster the snapshots go to the cache PVC (`work_root`), where a later run finds them verified and
downloads nothing; the `reward_cache` artifact then holds a copy of the manifest for lineage. With an
empty `work_root` (the local run) the snapshots live in the artifact itself.
"""

from typing import NamedTuple

from kfp.dsl import Artifact, Output

from components._factory import make_component


def cache_reward_models(
    config: dict, work_root: str, models_fingerprint: str, reward_cache: Output[Artifact]
) -> NamedTuple("Outputs", [("cache_dir", str)]):
    """Returns the directory that train and evaluate read the snapshots from. `models_fingerprint` (the
    models' resolved revisions) is an input only so that KFP's cache key changes with the models."""
    import shutil
    from collections import namedtuple
    from pathlib import Path

    from marble import stages
    from marble.config import MarbleConfig

    cfg = MarbleConfig.model_validate(config)
    cache_dir = Path(work_root) / "reward-cache" if work_root else Path(reward_cache.path)
    manifest = Path(stages.cache_reward_models(cfg, cache_dir))
    if work_root:
        Path(reward_cache.path).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(manifest, Path(reward_cache.path) / manifest.name)
    reward_cache.metadata["cache_dir"] = str(cache_dir)
    reward_cache.metadata["config_hash"] = cfg.config_hash()
    reward_cache.metadata["models_fingerprint"] = models_fingerprint
    return namedtuple("Outputs", ["cache_dir"])(str(cache_dir))


def build(containerized: bool = False):
    return make_component(cache_reward_models, role="cpu", containerized=containerized)


component = build()
