"""The marble pipeline: a validation step, the stage components, the promotion gate as a branch, an
exit handler, their wiring, resources, mounts, secrets and caching.

Run parameters: the typed settings people change between runs (`marble.runparams.RUN_PARAMETERS`,
defaults from the config the pipeline is compiled with) plus `config`, the whole config as an advanced
override. The first task (`validate-config`) applies the parameters to the override, validates the
result and hands it to every later task. The Kubernetes settings (resources, GPUs, node
selector, tolerations, PVC, secrets, the training launch) are read from the `pipeline:` section of the
compile-time config (applied by `pipelines/kube.py`) and fixed in the compiled spec; they are no run
parameters.

The model lock of the config (`marble lock`) travels as `model_lock` with its hash `model_lock_sha256`
(defaults: the lock the pipeline is compiled with, so the compiled pipeline records its hash); the
stages that load models refuse a lock that is not the recorded one. The cache task reports its
manifest's sha256, which train and evaluate verify the manifest on the volume against.
"""

import inspect
import logging
from pathlib import Path
from typing import Any

from kfp import dsl

from components import (
    cache_reward_models,
    evaluate,
    finalize_run,
    fingerprint_inputs,
    gate,
    prepare_prompts,
    promote,
    record_candidate,
    train,
    validate_config,
)
from marble.cluster.launch import LaunchPlan, plan_launch
from marble.cluster.preflight import cluster_problems
from marble.cluster.secrets import REGISTRY_TASKS, task_secrets, unused_secrets
from marble.config import MarbleConfig, TaskResources
from marble.configio import ConfigError, load_config
from marble.hub.lock import ModelLock
from marble.model_cache import lock_parameters
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
from pipelines import images, kube

log = logging.getLogger(__name__)

DESCRIPTION = (
    "MARBLE: multi-reward RL fine-tuning (DiffusionNFT + gradient balancing) of a diffusion model's LoRA "
    "adapter: validate the run's config, prepare prompts, cache reward models, train, evaluate, register."
)
CONFIG_PARAMETER_HELP = (
    "Advanced: the whole marble config (without its Kubernetes `pipeline:` section). The run parameters "
    "above replace the fields they name."
)
_COMPONENTS = (
    validate_config, fingerprint_inputs, prepare_prompts, cache_reward_models, train, evaluate, gate,
    promote, record_candidate, finalize_run,
)  # fmt: skip
LOCK_PARAMETER_HELP = {
    "model_lock": "The model lock (`marble lock`): every model's revision and file sha256; {} for none.",
    "model_lock_sha256": "sha256 of model_lock, recorded at compile time; a different lock is refused.",
}
__all__ = ["build_pipeline", "compile_pipeline", "config_dict", "pipeline_arguments"]


def default_config_path() -> Path:
    """A checkout's `params.yaml` (the DVC dump of the config), else the shipped `tiny` config."""
    root = checkout_root()
    if root is not None and (root / "params.yaml").is_file():
        return root / "params.yaml"
    return CONFIG_DIR / "tiny.yaml"


def default_config() -> MarbleConfig:
    return load_config(default_config_path())


# ------------------------------------------------------------------------------------------ the DAG
def pipeline_signature(cfg: MarbleConfig, lock: ModelLock | None = None) -> tuple[inspect.Signature, str]:
    """The pipeline function's typed parameters (defaults from `cfg` and its model lock) and its
    docstring, whose `Args:` section kfp compiles into each parameter's description."""
    defaults = run_parameter_values(cfg)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [
        inspect.Parameter(p.name, kind, default=defaults[p.name], annotation=p.type) for p in RUN_PARAMETERS
    ]
    params.append(inspect.Parameter("config", kind, default=override_parameter(cfg), annotation=dict))
    for name, value in lock_parameters(lock).items():
        params.append(inspect.Parameter(name, kind, default=value, annotation=type(value)))
    lines = [f"    {p.name}: {p.description}" for p in RUN_PARAMETERS]
    lines.append(f"    config: {CONFIG_PARAMETER_HELP}")
    lines += [f"    {name}: {text}" for name, text in LOCK_PARAMETER_HELP.items()]
    return inspect.Signature(params), DESCRIPTION + "\n\nArgs:\n" + "\n".join(lines) + "\n"


def build_pipeline(
    cfg: MarbleConfig | None = None, *, containerized: bool = True, lock: ModelLock | None = None
):
    """The pipeline function for `cfg` (default: `default_config()`) and its model lock, if any.

    `containerized=True` runs each component in its pinned image (cluster); `False` gives lightweight
    components for `kfp.local.SubprocessRunner`. Kubernetes settings come from `cfg.pipeline`; the
    persistent work directory for reward snapshots and checkpoints is the cache PVC's mount on a
    cluster and the task artifacts locally.
    """
    cfg = cfg or default_config()
    k8s = cfg.pipeline
    plan = plan_launch(cfg, image=images.IMAGES["cuda"])
    if containerized and cluster_problems(cfg):
        raise ConfigError("cannot run on a cluster: " + "; ".join(cluster_problems(cfg)))
    for problem in unused_secrets(cfg):
        log.warning(problem)
    work_root = k8s.cache_mount if containerized else ""
    ops = {m.__name__.rsplit(".", 1)[-1]: m.build(containerized) for m in _COMPONENTS}
    signature, doc = pipeline_signature(cfg, lock)
    names = list(signature.parameters)

    def marble_pipeline(*args):
        # kfp calls the pipeline function with one channel per parameter, in signature order.
        params = dict(zip(names, args, strict=True))
        # The exit handler records how the run ended and, for a multi-node run, deletes its PyTorchJob
        # however the run ends (kfp allows one exit handler per pipeline: one task does both).
        jobs = plan.kind == "pytorchjob"
        finalize = ops["finalize_run"](
            work_root=work_root, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, delete_train_jobs=jobs
        )
        kube.with_cache_volume(_settings(finalize, cfg, "finalize-run", k8s.resources.cleanup), k8s)
        if jobs:
            kube.with_namespace_env(finalize)
        with dsl.ExitHandler(finalize, name="marble-run"):
            _stages(ops, cfg, plan, params, work_root, containerized)

    marble_pipeline.__signature__ = signature
    marble_pipeline.__doc__ = doc
    return dsl.pipeline(name=k8s.name, description=DESCRIPTION, pipeline_root=k8s.pipeline_root)(
        marble_pipeline
    )


def _settings(
    task: dsl.PipelineTask, cfg: MarbleConfig, name: str, resources: TaskResources
) -> dsl.PipelineTask:
    """Resources, deadline, identity and the secrets this task reads (and no other)."""
    kube.with_resources(task, resources)
    kube.with_security(task, cfg.pipeline)
    return kube.with_secrets(task, task_secrets(cfg).get(name, []))


def _stages(
    ops: dict,
    cfg: MarbleConfig,
    plan: LaunchPlan,
    params: dict[str, Any],
    work_root: str,
    containerized: bool,
) -> None:
    """validate-config and fingerprint-inputs, the stages on the validated config, the gate's branches."""
    k8s, res = cfg.pipeline, cfg.pipeline.resources
    validate_task = ops["validate_config"](
        config=params["config"],
        kubernetes=kubernetes_section(cfg),
        **{name: params[name] for name in RUN_PARAMETER_NAMES},
    )
    # Checks the run's config (a run parameter may change the epoch's size: the world size is re-checked).
    _settings(validate_task, cfg, "validate-config", res.prepare_prompts)
    config = validate_task.outputs["config"]

    fingerprint = ops["fingerprint_inputs"](config=config)
    _settings(fingerprint, cfg, "fingerprint-inputs", res.prepare_prompts).set_caching_options(False)

    prepare = ops["prepare_prompts"](config=config, data_fingerprint=fingerprint.outputs["data"])
    _settings(prepare, cfg, "prepare-prompts", res.prepare_prompts)

    locked = {"model_lock": params["model_lock"], "model_lock_sha256": params["model_lock_sha256"]}
    cache = ops["cache_reward_models"](
        config=config, work_root=work_root, models_fingerprint=fingerprint.outputs["models"], **locked
    )
    kube.with_cache_volume(_settings(cache, cfg, "cache-reward-models", res.cache_reward_models), k8s)
    cached = {
        "reward_cache_dir": cache.outputs["cache_dir"],
        "reward_cache_sha256": cache.outputs["manifest_sha256"],
        **locked,
    }

    train_task = ops["train"](
        config=config,
        prompts=prepare.outputs["prompts"],
        work_root=work_root,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        launch=plan.to_dict(),
        tensorboard_pvc=k8s.cache_pvc if work_root else "",
        **cached,
    )
    kube.with_cache_volume(train_task, k8s)
    if plan.kind == "pytorchjob":  # the task launches and watches; the job's replicas hold the GPUs
        launcher = res.launcher.model_copy(update={"timeout_s": res.train.timeout_s})
        kube.with_namespace_env(_settings(train_task, cfg, "train", launcher))
    else:
        kube.on_gpu_nodes(_settings(train_task, cfg, "train", res.train), k8s)
    if containerized:
        # A retried task resumes from the newest checkpoint in its run's directory on the PVC.
        # Locally (where kfp.local honours retries too) a failure should stop the demo at once.
        kube.with_retries(train_task, k8s, res.train.timeout_s)
    train_task.set_caching_options(False)

    evaluate_task = ops["evaluate"](
        config=config,
        prompts=prepare.outputs["prompts"],
        adapter=train_task.outputs["adapter"],
        train_dir=train_task.outputs["train_dir"],
        **cached,
    )
    kube.on_gpu_nodes(
        kube.with_cache_volume(_settings(evaluate_task, cfg, "evaluate", res.evaluate), k8s), k8s
    )
    evaluate_task.set_caching_options(False)

    _gate_and_branches(ops, cfg, config, work_root, train_task, evaluate_task)


def _gate_and_branches(ops: dict, cfg: MarbleConfig, config: Any, work_root: str, train_task, evaluate_task):
    """The gate decides; `dsl.If` runs promote ('champion') or record-candidate, so the run's graph
    shows which way it went. All three read the registry (the embedded store in `<work_root>/registry`
    on the PVC, where `champion` carries over between runs) and are never cached: a cached registration
    would silently skip registering, a cached gate would decide against an old champion."""
    artifacts = {"adapter": train_task.outputs["adapter"], "evaluation": evaluate_task.outputs["evaluation"]}
    tasks = [ops["gate"](config=config, work_root=work_root, **artifacts)]
    with dsl.If(tasks[0].outputs["decision"] == "champion", name="gate-passed"):
        tasks.append(ops["promote"](config=config, work_root=work_root, **artifacts))
    with dsl.Else(name="gate-failed"):
        tasks.append(ops["record_candidate"](config=config, work_root=work_root, **artifacts))
    for task, name in zip(tasks, REGISTRY_TASKS, strict=True):
        settings = _settings(task, cfg, name, cfg.pipeline.resources.register_adapter)
        kube.with_cache_volume(settings, cfg.pipeline).set_caching_options(False)


def pipeline_arguments(cfg: MarbleConfig, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run arguments for `cfg`: its run parameters (`params` replacing some) and the config override.

    Not validated here: the run's first task validates them (`check_arguments` does the same up front).
    """
    return {**run_parameter_values(cfg), **(params or {}), "config": override_parameter(cfg)}


def check_arguments(cfg: MarbleConfig, arguments: dict[str, Any]) -> MarbleConfig:
    """What the run's validation task will do, done before sending a run to a cluster."""
    values = {k: v for k, v in arguments.items() if k != "config"}
    return apply_run_parameters(arguments["config"], values, kubernetes_section(cfg))[0]


def compile_pipeline(cfg: MarbleConfig, out: str | Path, lock: ModelLock | None = None) -> Path:
    """Compile the containerized pipeline for `cfg` (and its model lock) to IR YAML at `out` (written
    atomically)."""
    import tempfile

    from kfp import compiler

    from pipelines.images import placeholder_images

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        compiler.Compiler().compile(build_pipeline(cfg, containerized=True, lock=lock), str(staged))
        staged.replace(out)
    if placeholder_images():
        log.warning(
            "%s names PLACEHOLDER image digests (%s): run `make images` to build, push and pin the images "
            "before running it on a cluster",
            out,
            ", ".join(placeholder_images()),
        )
    return out
