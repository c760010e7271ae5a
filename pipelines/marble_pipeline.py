"""The marble pipeline: a validation step, five stage components, their wiring, resources, mounts,
secrets and caching.

Run parameters: the typed settings people change between runs (`marble.runparams.RUN_PARAMETERS`,
defaults from the config the pipeline is compiled with) plus `config`, the whole config as an advanced
override. The first task (`validate-config`) applies the parameters to the override, validates the
result and hands it to every later task. The Kubernetes settings (GPU type and count, node selector,
tolerations, PVC, secret names) are read from the `pipeline:` section of the compile-time config and
fixed in the compiled spec; they are no run parameters.
"""

import inspect
import logging
from pathlib import Path
from typing import Any

from kfp import dsl, kubernetes

from components import (
    cache_reward_models,
    evaluate,
    prepare_prompts,
    register_adapter,
    train,
    validate_config,
)
from marble.config import MarbleConfig, PipelineConfig
from marble.configio import load_config
from marble.runparams import (
    RUN_PARAMETER_NAMES,
    RUN_PARAMETERS,
    apply_run_parameters,
    config_dict,
    kubernetes_section,
    override_parameter,
    run_parameter_values,
)
from marble.shipped import CONFIG_DIR, checkout_root

log = logging.getLogger(__name__)

DESCRIPTION = (
    "MARBLE: multi-reward RL fine-tuning (DiffusionNFT + gradient balancing) of a diffusion model's LoRA "
    "adapter: validate the run's config, prepare prompts, cache reward models, train, evaluate, register."
)
CONFIG_PARAMETER_HELP = (
    "Advanced: the whole marble config (without its Kubernetes `pipeline:` section). The run parameters "
    "above replace the fields they name."
)
HF_TOKEN_ENV = "HF_TOKEN"
DVC_CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
__all__ = ["build_pipeline", "compile_pipeline", "config_dict", "pipeline_arguments"]


def default_config_path() -> Path:
    """A checkout's `params.yaml` (the DVC dump of the config), else the shipped `tiny` config."""
    root = checkout_root()
    if root is not None and (root / "params.yaml").is_file():
        return root / "params.yaml"
    return CONFIG_DIR / "tiny.yaml"


def default_config() -> MarbleConfig:
    return load_config(default_config_path())


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
def pipeline_signature(cfg: MarbleConfig) -> tuple[inspect.Signature, str]:
    """The pipeline function's typed parameters (defaults from `cfg`) and its docstring, whose `Args:`
    section kfp compiles into each parameter's description."""
    defaults = run_parameter_values(cfg)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [
        inspect.Parameter(p.name, kind, default=defaults[p.name], annotation=p.type) for p in RUN_PARAMETERS
    ]
    params.append(inspect.Parameter("config", kind, default=override_parameter(cfg), annotation=dict))
    lines = [f"    {p.name}: {p.description}" for p in RUN_PARAMETERS]
    lines.append(f"    config: {CONFIG_PARAMETER_HELP}")
    return inspect.Signature(params), DESCRIPTION + "\n\nArgs:\n" + "\n".join(lines) + "\n"


def build_pipeline(cfg: MarbleConfig | None = None, *, containerized: bool = True):
    """The pipeline function for `cfg` (default: `default_config()`).

    `containerized=True` runs each component in its pinned image (cluster); `False` gives lightweight
    components for `kfp.local.SubprocessRunner`. Kubernetes settings come from `cfg.pipeline`; the
    persistent work directory for reward snapshots and checkpoints is the cache PVC's mount on a
    cluster and the task artifacts locally.
    """
    cfg = cfg or default_config()
    k8s = cfg.pipeline
    if k8s.gpus > 1:
        log.warning(
            "pipeline.gpus=%d: the pipeline's train task is one process and uses one GPU; "
            "multi-GPU / multi-node training runs as the PyTorchJob in manifests/",
            k8s.gpus,
        )
    work_root = k8s.cache_mount if containerized else ""
    ops = {
        m.__name__.rsplit(".", 1)[-1]: m.build(containerized)
        for m in (validate_config, prepare_prompts, cache_reward_models, train, evaluate, register_adapter)
    }
    signature, doc = pipeline_signature(cfg)
    names = list(signature.parameters)

    def marble_pipeline(*args):
        # kfp calls the pipeline function with one channel per parameter, in signature order.
        params = dict(zip(names, args, strict=True))
        _stages(ops, cfg, params, work_root, containerized)

    marble_pipeline.__signature__ = signature
    marble_pipeline.__doc__ = doc
    return dsl.pipeline(name=k8s.name, description=DESCRIPTION, pipeline_root=k8s.pipeline_root)(
        marble_pipeline
    )


def _stages(
    ops: dict, cfg: MarbleConfig, params: dict[str, Any], work_root: str, containerized: bool
) -> None:
    """validate-config, then the five stages on the validated config."""
    k8s = cfg.pipeline
    validate_task = ops["validate_config"](
        config=params["config"],
        kubernetes=kubernetes_section(cfg),
        **{name: params[name] for name in RUN_PARAMETER_NAMES},
    )
    config = validate_task.outputs["config"]

    prepare_task = ops["prepare_prompts"](config=config)
    with_secret_env(prepare_task, k8s.dvc_secret, {k: k for k in DVC_CREDENTIAL_KEYS})

    cache_task = ops["cache_reward_models"](config=config, work_root=work_root)
    with_cache_volume(cache_task, k8s)
    with_secret_env(cache_task, k8s.hub_token_secret, {HF_TOKEN_ENV: HF_TOKEN_ENV})

    train_task = ops["train"](
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

    evaluate_task = ops["evaluate"](
        config=config,
        prompts=prepare_task.outputs["prompts"],
        adapter=train_task.outputs["adapter"],
        reward_cache_dir=cache_task.outputs["cache_dir"],
        train_dir=train_task.outputs["train_dir"],
    )
    on_gpu_nodes(with_cache_volume(evaluate_task, k8s), k8s)
    evaluate_task.set_caching_options(False)

    register_task = ops["register_adapter"](
        config=config,
        adapter=train_task.outputs["adapter"],
        evaluation=evaluate_task.outputs["evaluation"],
    )
    # The PVC is where an embedded registry (registry.tracking_uri: sqlite:////<mount>/...) persists.
    with_cache_volume(register_task, k8s)
    with_secret_env(register_task, k8s.registry_token_secret, registry_token_env(cfg))
    register_task.set_caching_options(False)


def pipeline_arguments(cfg: MarbleConfig, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run arguments for `cfg`: its run parameters (`params` replacing some) and the config override.

    Not validated here: the run's first task validates them (`check_arguments` does the same up front).
    """
    return {**run_parameter_values(cfg), **(params or {}), "config": override_parameter(cfg)}


def check_arguments(cfg: MarbleConfig, arguments: dict[str, Any]) -> MarbleConfig:
    """What the run's validation task will do, done before sending a run to a cluster."""
    values = {k: v for k, v in arguments.items() if k != "config"}
    return apply_run_parameters(arguments["config"], values, kubernetes_section(cfg))[0]


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
