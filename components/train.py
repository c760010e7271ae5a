"""Component for stage 3: MARBLE training of the LoRA adapter (`marble.cluster.train_task`).

`launch` is the launch plan compiled from the config's `pipeline:` section (`marble.cluster.launch`):
one process in this task, `accelerate launch` of N processes in this task's container (one node, N
GPUs), or a PyTorchJob of `pipeline.nodes` replicas that this task creates, watches and deletes when the
run is cancelled. The training directory (checkpoints, metrics.jsonl) is keyed by the pipeline run id
under `work_root` (the cache PVC on a cluster), so a retried task resumes from its own checkpoints and a
new run never sees another run's. The exported adapter is copied into the `adapter` Model artifact:
the files evaluated and registered downstream are exactly these.
"""

from typing import NamedTuple

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components._factory import make_component


def train(
    config: dict,
    prompts: Input[Dataset],
    reward_cache_dir: str,
    reward_cache_sha256: str,
    model_lock: dict,
    model_lock_sha256: str,
    work_root: str,
    run_id: str,
    launch: dict,
    tensorboard_pvc: str,
    adapter: Output[Model],
    metrics: Output[Metrics],
    training_curves: Output[HTML],
    mlpipeline_ui_metadata: Output[Artifact],
) -> NamedTuple("Outputs", [("train_dir", str)]):
    """Returns the training directory (for the report's training curves). For the run view: `metrics`
    (final per-reward means, α, skipped steps, time per step), `training_curves` and
    `mlpipeline_ui_metadata`, KFP's "Start TensorBoard" on the run's event files (on the PVC
    `tensorboard_pvc` when given)."""
    import json
    from collections import namedtuple
    from pathlib import Path

    from components._io import publish_dir
    from marble.cluster.launch import LaunchPlan
    from marble.cluster.train_task import run_train_task
    from marble.config import MarbleConfig
    from marble.model_cache import lock_from_parameters
    from marble.runview import train_view_files

    cfg = MarbleConfig.model_validate(config)
    lock = lock_from_parameters(model_lock, model_lock_sha256)
    run_dir = Path(work_root) / "runs" / run_id if work_root else Path(adapter.path).parent
    plan = LaunchPlan.from_dict(launch)
    train_dir = run_train_task(
        cfg, plan, Path(prompts.path), reward_cache_dir or None, run_dir, run_id,
        lock=lock, reward_cache_sha256=reward_cache_sha256 or None,
    )  # fmt: skip
    publish_dir(train_dir / "adapter", adapter.path)
    adapter.metadata["config_hash"] = cfg.config_hash()
    adapter.metadata["base_model"] = cfg.model.pretrained
    adapter.metadata["lora_rank"] = cfg.lora.rank
    adapter.metadata["launch"] = f"{plan.kind}: {plan.nodes} node(s) x {plan.procs_per_node} process(es)"
    values, page, viewer = train_view_files(cfg, train_dir, tensorboard_pvc=tensorboard_pvc, mount=work_root)
    for name, value in values.items():
        metrics.log_metric(name, value)
    Path(training_curves.path).write_text(page, encoding="utf-8")
    Path(mlpipeline_ui_metadata.path).write_text(json.dumps(viewer), encoding="utf-8")
    return namedtuple("Outputs", ["train_dir"])(str(train_dir))


def build(containerized: bool = False):
    return make_component(train, role="cuda", containerized=containerized)


component = build()
