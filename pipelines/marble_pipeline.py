"""The marble pipeline: five stage components, their wiring, resources, mounts, secrets and caching.

The ML settings travel as ONE dict parameter (`config`, re-validated by every component); the
Kubernetes settings (GPU type and count, node selector, tolerations, PVC, secret names) are read from
the `pipeline:` section of the config the pipeline is compiled with, because Kubernetes options are
fixed in the compiled spec.
"""

import logging
from pathlib import Path
from typing import Any

from kfp import dsl, kubernetes

from components import cache_reward_models, evaluate, prepare_prompts, register_adapter, train
from marble.config import MarbleConfig, PipelineConfig
from marble.configio import ConfigError, load_config

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DESCRIPTION = (
    "MARBLE: multi-reward RL fine-tuning (DiffusionNFT + gradient balancing) of a diffusion model's LoRA "
    "adapter: prepare prompts, cache reward models, train, evaluate, register."
)
HF_TOKEN_ENV = "HF_TOKEN"
DVC_CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def default_config_path() -> Path:
    """`params.yaml` (the DVC dump of the config) when the repo has one, else `configs/tiny.yaml`."""
    params = REPO_ROOT / "params.yaml"
    return params if params.is_file() else REPO_ROOT / "configs" / "tiny.yaml"


def default_config() -> MarbleConfig:
    return load_config(default_config_path())


def config_dict(cfg: MarbleConfig) -> dict[str, Any]:
    """`cfg` as the pipeline's `config` parameter: JSON types, nulls left out.

    kfp 2.17 refuses None inside a dict default (protobuf Struct via `to_protobuf_value`), so null fields
    are dropped; that is lossless only when each dropped field's default is null too, which is checked.
    """
    data = cfg.model_dump(mode="json", exclude_none=True)
    if MarbleConfig.model_validate(data) != cfg:
        full = cfg.model_dump(mode="json")
        lost = sorted(_null_paths(full))
        raise ConfigError(
            f"config: a null value that differs from the field's default cannot travel as a Kubeflow "
            f"parameter (kfp 2.17); set an explicit value instead of null for one of: {', '.join(lost)}"
        )
    return data


def _null_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _null_paths(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _null_paths(v, f"{prefix}.{i}")]
    return [prefix] if node is None else []


# ------------------------------------------------------------------------------- Kubernetes helpers
def on_gpu_nodes(task: dsl.PipelineTask, k8s: PipelineConfig) -> dsl.PipelineTask:
    """Accelerators, CPU/memory limits, node selector and tolerations of a GPU task."""
    task.set_cpu_limit(k8s.cpu).set_memory_limit(k8s.memory)
    if k8s.gpus:
        task.set_accelerator_type(k8s.accelerator_type).set_accelerator_limit(k8s.gpus)
    for key, value in sorted(k8s.node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in k8s.tolerations:
        kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    return task


def with_cache_volume(task: dsl.PipelineTask, k8s: PipelineConfig) -> dsl.PipelineTask:
    """Mount the cache PVC (reward/model snapshots, training checkpoints) at `k8s.cache_mount`."""
    return kubernetes.mount_pvc(task, pvc_name=k8s.cache_pvc, mount_path=k8s.cache_mount)


def with_secret_env(task: dsl.PipelineTask, secret: str, keys_to_env: dict[str, str]) -> dsl.PipelineTask:
    """Expose keys of a Kubernetes secret as environment variables. Optional: a missing secret (public
    models, no registry server) must not block the run; the stage that needs it says so."""
    return kubernetes.use_secret_as_env(
        task, secret_name=secret, secret_key_to_env=keys_to_env, optional=True
    )


def registry_token_env(cfg: MarbleConfig) -> dict[str, str]:
    """Secret key -> environment variable the configured registry backend reads its token from."""
    env = {"MLFLOW_TRACKING_TOKEN": "MLFLOW_TRACKING_TOKEN"}
    token_env = getattr(cfg.registry, "token_env", None)
    env["MODEL_REGISTRY_TOKEN"] = token_env or "MODEL_REGISTRY_TOKEN"
    return env


# ------------------------------------------------------------------------------------------ the DAG
def build_pipeline(cfg: MarbleConfig | None = None, *, containerized: bool = True):
    """The pipeline function for `cfg` (default: `default_config()`).

    `containerized=True` runs each component in its pinned image (cluster); `False` gives lightweight
    components for `kfp.local.SubprocessRunner`. Kubernetes settings come from `cfg.pipeline`.
    """
    cfg = cfg or default_config()
    k8s = cfg.pipeline
    if k8s.gpus > 1:
        log.warning(
            "pipeline.gpus=%d: the pipeline's train task is one process and uses one GPU; "
            "multi-GPU / multi-node training runs as the PyTorchJob in manifests/",
            k8s.gpus,
        )
    prepare_op = prepare_prompts.build(containerized)
    cache_op = cache_reward_models.build(containerized)
    train_op = train.build(containerized)
    evaluate_op = evaluate.build(containerized)
    register_op = register_adapter.build(containerized)

    @dsl.pipeline(name=k8s.name, description=DESCRIPTION, pipeline_root=k8s.pipeline_root)
    def marble_pipeline(config: dict = config_dict(cfg), work_root: str = k8s.cache_mount):
        """config: the whole MarbleConfig as a dict. work_root: persistent directory for reward
        snapshots and training checkpoints (the cache PVC mount); empty keeps them in artifacts."""
        prepare_task = prepare_op(config=config)
        with_secret_env(prepare_task, k8s.dvc_secret, {k: k for k in DVC_CREDENTIAL_KEYS})

        cache_task = cache_op(config=config, work_root=work_root)
        with_cache_volume(cache_task, k8s)
        with_secret_env(cache_task, k8s.hub_token_secret, {HF_TOKEN_ENV: HF_TOKEN_ENV})

        train_task = train_op(
            config=config,
            prompts=prepare_task.outputs["prompts"],
            reward_cache_dir=cache_task.outputs["cache_dir"],
            work_root=work_root,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        on_gpu_nodes(with_cache_volume(train_task, k8s), k8s)
        if containerized:
            # A retried task resumes from the newest checkpoint in its run's directory on the PVC.
            # Locally (where kfp.local honours retries too) a failure should stop the demo at once.
            train_task.set_retry(num_retries=k8s.train_retries, backoff_duration="60s", backoff_factor=2.0)
        train_task.set_caching_options(False)

        evaluate_task = evaluate_op(
            config=config,
            prompts=prepare_task.outputs["prompts"],
            adapter=train_task.outputs["adapter"],
            reward_cache_dir=cache_task.outputs["cache_dir"],
            train_dir=train_task.outputs["train_dir"],
        )
        on_gpu_nodes(with_cache_volume(evaluate_task, k8s), k8s)
        evaluate_task.set_caching_options(False)

        register_task = register_op(
            config=config,
            adapter=train_task.outputs["adapter"],
            evaluation=evaluate_task.outputs["evaluation"],
        )
        # The PVC is where an embedded registry (registry.tracking_uri: sqlite:////<mount>/...) persists.
        with_cache_volume(register_task, k8s)
        with_secret_env(register_task, k8s.registry_token_secret, registry_token_env(cfg))
        register_task.set_caching_options(False)

    return marble_pipeline


def pipeline_arguments(cfg: MarbleConfig, *, work_root: str | None = None) -> dict[str, Any]:
    """Run arguments for `cfg`: the config dict, and `work_root` when given."""
    args: dict[str, Any] = {"config": config_dict(cfg)}
    if work_root is not None:
        args["work_root"] = work_root
    return args


def compile_pipeline(cfg: MarbleConfig, out: str | Path) -> Path:
    """Compile the containerized pipeline for `cfg` to IR YAML at `out` (written atomically)."""
    import tempfile

    from kfp import compiler

    from pipelines.images import placeholder_images

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        compiler.Compiler().compile(build_pipeline(cfg, containerized=True), str(staged))
        staged.replace(out)
    if placeholder_images():
        log.warning(
            "%s names PLACEHOLDER image digests (%s): run `make images` to build, push and pin the images "
            "before running it on a cluster",
            out,
            ", ".join(placeholder_images()),
        )
    return out
