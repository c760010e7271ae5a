"""Component for stage 5: register the adapter, promote it only if the gate passes (`marble.stages.register_adapter`)."""

from kfp.dsl import Artifact, Input, Model, Output

from components._factory import make_component


def register_adapter(
    config: dict,
    work_root: str,
    adapter: Input[Model],
    evaluation: Input[Artifact],
    registration: Output[Artifact],
):
    """Registers the `adapter` artifact (the files train exported and evaluate scored); the record is
    written to `registration/registration.json` and its scalar fields to the artifact's metadata. An
    embedded registry store lives in `<work_root>/registry` (the cache PVC), so `champion` carries over
    between runs; with an empty `work_root` (the local run) it lives in the artifact."""
    from pathlib import Path

    from components._io import scalar_metadata
    from marble import stages
    from marble.config import MarbleConfig

    cfg = MarbleConfig.model_validate(config)
    store = Path(work_root) / "registry" if work_root else None
    record = stages.register_adapter(
        cfg, Path(adapter.path), Path(evaluation.path), Path(registration.path), registry_dir=store
    )
    registration.metadata.update(scalar_metadata(record))


def build(containerized: bool = False):
    return make_component(register_adapter, role="cpu", containerized=containerized)


component = build()
