"""Component for stage 1: validate, mix and split the prompt sources (`marble.stages.prepare_prompts`)."""

from kfp.dsl import Dataset, Output

from components._factory import make_component


def prepare_prompts(config: dict, data_fingerprint: str, prompts: Output[Dataset]):
    """Write train/test JSONL and the manifest into the `prompts` Dataset directory. `data_fingerprint`
    (the prompt files' hashes) is an input only so that KFP's cache key changes with the data."""
    from pathlib import Path

    from marble import stages
    from marble.config import MarbleConfig

    cfg = MarbleConfig.model_validate(config)
    manifest = stages.prepare_prompts(cfg, Path(prompts.path))
    prompts.metadata["config_hash"] = cfg.config_hash()
    prompts.metadata["manifest"] = Path(manifest).name
    prompts.metadata["data_fingerprint"] = data_fingerprint


def build(containerized: bool = False):
    return make_component(prepare_prompts, role="cpu", containerized=containerized)


component = build()
