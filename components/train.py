"""Component for stage 3: MARBLE training of the LoRA adapter (`marble.stages.train`).

The training directory (checkpoints, metrics.jsonl) is keyed by the pipeline run id under
`work_root` (the cache PVC on a cluster), so a retried task finds its own checkpoints and resumes from
the latest one (`train.resume: latest`). The exported adapter is copied into the `adapter` Model
artifact: the files evaluated and registered downstream are exactly these.
"""

from typing import NamedTuple

from kfp.dsl import Dataset, Input, Model, Output

from components._factory import make_component


def train(
    config: dict,
    prompts: Input[Dataset],
    reward_cache_dir: str,
    work_root: str,
    run_id: str,
    adapter: Output[Model],
) -> NamedTuple("Outputs", [("train_dir", str)]):
    """Returns the training directory (for the report's training curves)."""
    from collections import namedtuple
    from pathlib import Path

    from components._io import publish_dir
    from marble import stages
    from marble.config import MarbleConfig

    cfg = MarbleConfig.model_validate(config)
    root = Path(work_root) / "runs" / run_id if work_root else Path(adapter.path).parent
    train_dir = root / "train"
    adapter_dir = stages.train(cfg, Path(prompts.path), train_dir, reward_cache=reward_cache_dir or None)
    publish_dir(adapter_dir, adapter.path)
    adapter.metadata["config_hash"] = cfg.config_hash()
    adapter.metadata["base_model"] = cfg.model.pretrained
    adapter.metadata["lora_rank"] = cfg.lora.rank
    return namedtuple("Outputs", ["train_dir"])(str(train_dir))


def build(containerized: bool = False):
    return make_component(train, role="cuda", containerized=containerized)


component = build()
