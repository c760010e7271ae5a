"""The compiled pipeline: golden snapshot, Kubernetes settings, images, caching, retries, secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from kfp import dsl

from marble.config import MarbleConfig
from marble.configio import ConfigError, load_config
from marble.runparams import (
    RUN_PARAMETER_NAMES,
    RUN_PARAMETERS,
    apply_run_parameters,
    kubernetes_section,
    run_parameter_values,
)
from pipelines import images
from pipelines.marble_pipeline import (
    build_pipeline,
    compile_pipeline,
    config_dict,
    default_config,
    default_config_path,
)

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "pipelines" / "marble_pipeline.yaml"
GPU_TASKS = ("train", "evaluate")
REGISTRY_TASKS = ("gate", "promote", "record-candidate")
CPU_TASKS = (
    "validate-config",
    "fingerprint-inputs",
    "prepare-prompts",
    "cache-reward-models",
    *REGISTRY_TASKS,
    "finalize-run",
)
UNCACHED_TASKS = ("train", "evaluate", *REGISTRY_TASKS)
OUTPUT_ARTIFACTS = {
    "validate-config": {"run_config": "system.Markdown"},
    "fingerprint-inputs": {},
    "prepare-prompts": {"prompts": "system.Dataset"},
    "cache-reward-models": {"reward_cache": "system.Artifact"},
    "train": {
        "adapter": "system.Model",
        "metrics": "system.Metrics",
        "training_curves": "system.HTML",
        "mlpipeline_ui_metadata": "system.Artifact",
    },
    "evaluate": {
        "evaluation": "system.Artifact",
        "metrics": "system.Metrics",
        "report_html": "system.HTML",
        "report_md": "system.Markdown",
    },
    "gate": {
        "gate_decision": "system.Artifact",
        "gate_report": "system.Markdown",
        "metrics": "system.Metrics",
    },
    "promote": {
        "registration": "system.Artifact",
        "registration_report": "system.Markdown",
        "metrics": "system.Metrics",
    },
    "record-candidate": {
        "registration": "system.Artifact",
        "registration_report": "system.Markdown",
        "metrics": "system.Metrics",
    },
    "finalize-run": {"run_status": "system.Markdown"},
}
IR_TYPES = {int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING", bool: "BOOLEAN"}
SECRETISH = re.compile(r"pass(word|wd)?|token|secret|api[_-]?key|credential|private[_-]?key", re.IGNORECASE)
CREDENTIAL_VALUE = re.compile(
    r"hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}|-----BEGIN|eyJ[A-Za-z0-9_-]{20,}"
)
K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def compile_docs(tmp_path: Path, cfg: MarbleConfig | None = None) -> tuple[dict, dict]:
    """(pipeline spec, Kubernetes platform spec) of the pipeline compiled for `cfg`."""
    out = compile_pipeline(cfg or default_config(), tmp_path / "pipeline.yaml")
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    return compile_docs(tmp_path_factory.mktemp("compiled"))


def dag_tasks(spec: dict) -> dict:
    """Every task of the pipeline, the root DAG's and those inside sub-DAGs (the exit handlers', the
    gate's branches)."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        tasks.update(comp.get("dag", {}).get("tasks", {}))
    return tasks


def all_tasks(spec: dict) -> dict[str, dict]:
    """Every leaf task of the IR by name (no sub-DAG tasks)."""
    return {
        n: t for n, t in dag_tasks(spec).items() if "dag" not in spec["components"][t["componentRef"]["name"]]
    }


def executor(spec: dict, task: str) -> dict:
    return spec["deploymentSpec"]["executors"][f"exec-{task}"]["container"]


def normalise(text: str) -> list:
    """Drop what legitimately changes without a pipeline change: kfp version pins and the parameters'
    defaults (checked against params.yaml separately, so a config edit does not need a new golden)."""
    docs = list(yaml.safe_load_all(text))
    docs[0].pop("sdkVersion", None)
    for param in docs[0]["root"]["inputDefinitions"]["parameters"].values():
        param["defaultValue"] = "<default>"
    dumped = yaml.safe_dump_all(docs, sort_keys=True)
    return list(yaml.safe_load_all(re.sub(r"kfp(-kubernetes)?==[0-9][0-9.a-z]*", "kfp==<pin>", dumped)))


def test_compiled_pipeline_matches_golden(tmp_path):
    fresh = compile_pipeline(default_config(), tmp_path / "pipeline.yaml").read_text()
    assert normalise(fresh) == normalise(GOLDEN.read_text()), (
        "the compiled pipeline changed: review the diff, then run `make compile` to update the golden file"
    )


def test_default_config_travels_losslessly(compiled):
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    defaults = {name: p["defaultValue"] for name, p in params.items()}
    kubernetes = validate_task(spec)["inputs"]["parameters"]["kubernetes"]["runtimeValue"]["constant"]
    # Protobuf Struct turns ints into floats (48 -> 48.0); the validation task re-validates, so the
    # config every later task sees must equal the file's.
    config = defaults.pop("config")
    defaults.pop("model_lock"), defaults.pop("model_lock_sha256")  # the lock travels beside the config
    cfg, notes = apply_run_parameters(config, defaults, kubernetes)
    assert cfg == load_config(default_config_path()) and notes == []
    assert default_config_path().name in ("params.yaml", "tiny.yaml")


def validate_task(spec: dict) -> dict:
    return dag_tasks(spec)["validate-config"]


def test_run_parameters_are_typed_with_the_config_defaults(compiled):
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert list(params) == sorted([*RUN_PARAMETER_NAMES, "config", "model_lock", "model_lock_sha256"])
    defaults = run_parameter_values(default_config())
    for p in RUN_PARAMETERS:
        ir = params[p.name]
        assert ir["parameterType"] == IR_TYPES[p.type], p.name
        # Protobuf numbers are doubles; an integer parameter's default is integral and typed integer.
        assert ir["defaultValue"] == defaults[p.name], p.name
        if p.type is int:
            assert float(ir["defaultValue"]).is_integer(), p.name
        assert p.field in ir["description"], p.name
    assert params["epochs"]["parameterType"] == "NUMBER_INTEGER"
    assert params["config"]["parameterType"] == "STRUCT"


def test_kubernetes_settings_are_compiled_in_not_run_parameters(compiled):
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert "pipeline" not in params["config"]["defaultValue"]
    assert not any(p.field.startswith("pipeline.") for p in RUN_PARAMETERS)
    assert "work_root" not in params
    kubernetes = validate_task(spec)["inputs"]["parameters"]["kubernetes"]["runtimeValue"]["constant"]
    assert kubernetes == kubernetes_section(default_config())


def test_every_task_takes_the_validated_config(compiled):
    spec, _ = compiled
    tasks = all_tasks(spec)
    inputs = validate_task(spec)["inputs"]["parameters"]
    assert inputs["config"] == {"componentInputParameter": "pipelinechannel--config"}
    for name in RUN_PARAMETER_NAMES:
        assert inputs[name] == {"componentInputParameter": f"pipelinechannel--{name}"}
    with_config = {n for n, t in tasks.items() if "config" in t["inputs"]["parameters"]}
    assert with_config == set(tasks) - {"finalize-run"}
    for name, task in tasks.items():
        if name in ("validate-config", "finalize-run"):
            continue
        config = task["inputs"]["parameters"]["config"]
        # In the gate's branches the validated config arrives through the branch's DAG inputs.
        assert config in (
            {"taskOutputParameter": {"producerTask": "validate-config", "outputParameterKey": "config"}},
            {"componentInputParameter": "pipelinechannel--validate-config-config"},
        ), name


def test_every_task_publishes_its_output_artifacts(compiled):
    from pipelines.views import output_types

    spec, _ = compiled
    assert output_types(spec) == OUTPUT_ARTIFACTS
    outputs = {n: spec["components"][t["componentRef"]["name"]] for n, t in all_tasks(spec).items()}
    assert outputs["validate-config"]["outputDefinitions"]["parameters"] == {
        "config": {"parameterType": "STRUCT"},
        "config_hash": {"parameterType": "STRING"},
    }
    assert outputs["gate"]["outputDefinitions"]["parameters"] == {"decision": {"parameterType": "STRING"}}


def test_the_gate_decision_is_a_branch(compiled):
    from pipelines.views import task_graph

    spec, _ = compiled
    conditions = {}
    for task in dag_tasks(spec).values():
        if "condition" in task.get("triggerPolicy", {}):
            (leaf,) = spec["components"][task["componentRef"]["name"]]["dag"]["tasks"]
            conditions[leaf] = (task["taskInfo"]["name"], task["triggerPolicy"]["condition"])
    channel = "inputs.parameter_values['pipelinechannel--gate-decision']"
    assert conditions == {
        "promote": ("gate-passed", f"{channel} == 'champion'"),
        "record-candidate": ("gate-failed", f"!({channel} == 'champion')"),
    }
    graph = task_graph(spec)
    assert graph.edges[("gate", "promote")] == "gate-passed: gate.decision == 'champion'"
    assert graph.edges[("gate", "record-candidate")] == "gate-failed: not (gate.decision == 'champion')"
    assert graph.edges[("evaluate", "gate")] == ""


def test_an_exit_handler_records_how_every_run_ends(compiled):
    spec, k8s = compiled
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "finalize-run"}
    assert root["exit-handler-1"]["taskInfo"]["name"] == "marble-run"
    finalize = root["finalize-run"]
    assert finalize["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert finalize["inputs"]["parameters"]["status"] == {
        "taskFinalStatus": {"producerTask": "exit-handler-1"}
    }
    # It writes the status beside the run's checkpoints on the PVC.
    work_root = finalize["inputs"]["parameters"]["work_root"]["runtimeValue"]["constant"]
    assert work_root == default_config().pipeline.cache_mount
    (mount,) = k8s["exec-finalize-run"]["pvcMount"]
    assert mount["mountPath"] == default_config().pipeline.cache_mount


def test_gpu_tasks_have_accelerators_tolerations_and_shm(compiled):
    spec, k8s = compiled
    cfg = default_config().pipeline
    for task in GPU_TASKS:
        resources = executor(spec, task)["resources"]
        assert resources["accelerator"]["resourceType"] == cfg.accelerator_type
        assert resources["accelerator"]["resourceCount"] == str(cfg.gpus)
        tolerations = k8s[f"exec-{task}"]["tolerations"]
        assert {t["key"] for t in tolerations} == {t.key for t in cfg.tolerations}
        assert k8s[f"exec-{task}"]["emptyDirMounts"] == [
            {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": cfg.shm_size}
        ]
    for task in CPU_TASKS:
        assert "accelerator" not in executor(spec, task).get("resources", {})
        assert "tolerations" not in k8s.get(f"exec-{task}", {})


@pytest.fixture(scope="module")
def all_compiled(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """The shipped configs, single node and multi-node, compiled."""
    tmp_path = tmp_path_factory.mktemp("variants")
    paper = REPO / "configs" / "sd35m-marble.yaml"
    on_pvc = "data.root=/mnt/marble-cache/data"
    variants = {
        "default": default_config(),
        "paper-1gpu": load_config(paper, [on_pvc, "pipeline.gpus=1"]),
        "paper": load_config(paper, [on_pvc]),
        "paper-3x8": load_config(
            paper, [on_pvc, "pipeline.gpus=8", "pipeline.nodes=3", "pipeline.cache_access_mode=ReadWriteMany"]
        ),
    }
    return {name: compile_docs(tmp_path / name, cfg) for name, cfg in variants.items()}


def test_every_task_has_requests_limits_timeout_and_a_non_root_identity(all_compiled):
    for variant, (spec, k8s) in all_compiled.items():
        for name, ex in spec["deploymentSpec"]["executors"].items():
            res = ex["container"].get("resources", {})
            for field in (
                "resourceCpuRequest",
                "resourceCpuLimit",
                "resourceMemoryRequest",
                "resourceMemoryLimit",
            ):
                assert res.get(field), f"{variant}/{name}: no {field}"
            assert int(k8s[name]["activeDeadlineSeconds"]) >= 60, f"{variant}/{name}: no timeout"
            assert k8s[name]["securityContext"]["runAsNonRoot"] is True, f"{variant}/{name}"
            assert int(k8s[name]["securityContext"]["runAsUser"]) > 0, f"{variant}/{name}"


def test_no_task_relies_on_an_optional_secret(all_compiled):
    """KFP 2.4/2.5 ignore `optional` on secret env: every referenced secret must be required, used."""
    for variant, (_, k8s) in all_compiled.items():
        for name, ex in k8s.items():
            for secret in ex.get("secretAsEnv", []):
                assert not secret.get("optional"), f"{variant}/{name}: optional secret {secret}"
    # The tiny default config reads no secret at all; the paper config only the hub token (gated model).
    assert not any(ex.get("secretAsEnv") for ex in all_compiled["default"][1].values())
    paper = {
        n: [s["secretName"] for s in ex.get("secretAsEnv", [])] for n, ex in all_compiled["paper"][1].items()
    }
    assert {n: v for n, v in paper.items() if v} == {
        "exec-fingerprint-inputs": ["marble-hf-token"],
        "exec-cache-reward-models": ["marble-hf-token"],
    }


def test_repo_relative_prompt_files_are_refused_for_a_cluster(tmp_path):
    with pytest.raises(ConfigError, match=r"data.sources.0.path='data/pickscore/train.txt'.*data.root"):
        compile_docs(tmp_path, load_config(REPO / "configs" / "sd35m-marble.yaml"))


def test_train_is_a_distributed_launch_when_gpus_or_nodes_exceed_one(all_compiled):
    compiled = all_compiled

    def launch(variant):
        spec = compiled[variant][0]
        return dag_tasks(spec)["train"]["inputs"]["parameters"]["launch"]["runtimeValue"]["constant"]

    assert launch("paper-1gpu")["kind"] == "process" and launch("paper-1gpu")["command"] == []
    single = launch("paper")
    assert single["kind"] == "accelerate"
    assert single["command"][:2] == ["accelerate", "launch"] and "--multi_gpu" in single["command"]
    assert single["command"][single["command"].index("--num_processes") + 1] == "8"
    multi = launch("paper-3x8")
    assert multi["kind"] == "pytorchjob" and multi["command"][0] == "torchrun"
    assert (multi["nodes"], multi["procs_per_node"]) == (3, 8) and images.is_pinned(multi["image"])
    # Multi-node: the train task only launches (no GPU), and an exit handler deletes the job.
    spec, _ = compiled["paper-3x8"]
    assert "accelerator" not in executor(spec, "train")["resources"]
    # The exit handler deletes the run's job however the run ends (and records how it ended).
    finalize = spec["root"]["dag"]["tasks"]["finalize-run"]
    assert finalize["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert finalize["inputs"]["parameters"]["delete_train_jobs"]["runtimeValue"]["constant"] is True
    single = compiled["paper"][0]["root"]["dag"]["tasks"]["finalize-run"]
    assert single["inputs"]["parameters"]["delete_train_jobs"]["runtimeValue"]["constant"] is False


def test_a_world_size_that_cannot_split_the_epoch_is_refused_naming_valid_counts():
    with pytest.raises(
        ConfigError,
        match=r"32 training processes.*Valid process counts for this config: 1, 2, 3, 4, 6, 8, 12, 24",
    ):
        load_config(
            REPO / "configs" / "sd35m-marble.yaml",
            ["pipeline.gpus=8", "pipeline.nodes=4", "pipeline.cache_access_mode=ReadWriteMany"],
        )
    with pytest.raises(ConfigError, match="ReadWriteMany"):
        load_config(REPO / "configs" / "sd35m-marble.yaml", ["pipeline.gpus=8", "pipeline.nodes=3"])


def test_node_selector_and_gpu_settings_come_from_the_config(tmp_path):
    cfg = default_config()
    cfg.pipeline.node_selector = {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    cfg.pipeline.accelerator_type = "nvidia.com/gpu"
    cfg.pipeline.gpus = 1
    cfg.pipeline.tolerations = [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}
    ]
    spec, k8s = compile_docs(tmp_path, cfg)
    for task in GPU_TASKS:
        assert k8s[f"exec-{task}"]["nodeSelector"]["labels"] == cfg.pipeline.node_selector
        assert k8s[f"exec-{task}"]["tolerations"] == [
            {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}
        ]


def test_no_gpu_request_when_gpus_is_zero(tmp_path):
    cfg = default_config()
    cfg.pipeline.gpus = 0
    spec, _ = compile_docs(tmp_path, cfg)
    assert "accelerator" not in executor(spec, "train")["resources"]


def test_every_image_is_pinned_by_digest(compiled):
    spec, _ = compiled
    refs = [e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()]
    assert len(refs) == len(OUTPUT_ARTIFACTS)
    for ref in refs:
        assert not ref.endswith(":latest") and ":latest@" not in ref, ref
        assert images.is_pinned(ref), f"{ref} is not registry/name@sha256:<64 hex>"
    assert set(refs) == set(images.IMAGES.values())


def test_tasks_run_the_containerized_components(compiled):
    spec, _ = compiled
    for name, ex in spec["deploymentSpec"]["executors"].items():
        assert ex["container"]["command"] == ["python3", "-m", "kfp.dsl.executor_main"], name
        assert "pip install" not in " ".join(ex["container"]["command"] + ex["container"]["args"])


def test_caching_is_off_for_train_evaluate_register(compiled):
    spec, _ = compiled
    tasks = dag_tasks(spec)
    for name in UNCACHED_TASKS:
        assert not tasks[name]["cachingOptions"].get("enableCache", False), name
    for name in ("prepare-prompts", "cache-reward-models"):
        assert tasks[name]["cachingOptions"]["enableCache"] is True, name
    # Their cache keys see the data and the models: fingerprints (never cached) are inputs.
    assert not tasks["fingerprint-inputs"]["cachingOptions"].get("enableCache", False)
    assert tasks["prepare-prompts"]["inputs"]["parameters"]["data_fingerprint"]["taskOutputParameter"] == {
        "producerTask": "fingerprint-inputs",
        "outputParameterKey": "data",
    }
    assert tasks["cache-reward-models"]["inputs"]["parameters"]["models_fingerprint"][
        "taskOutputParameter"
    ] == {"producerTask": "fingerprint-inputs", "outputParameterKey": "models"}


def test_train_retries_and_resumes_in_its_run_directory(compiled):
    spec, _ = compiled
    cfg = default_config().pipeline
    train = dag_tasks(spec)["train"]
    assert train["retryPolicy"]["maxRetryCount"] == cfg.train_retries
    # Argo cuts a retried pod at maxDuration from the first attempt (kfp's default: 3600 s): it must
    # cover every attempt running to its deadline plus the backoffs.
    max_duration = int(train["retryPolicy"]["backoffMaxDuration"].rstrip("s"))
    attempts = cfg.train_retries + 1
    assert max_duration >= attempts * cfg.resources.train.timeout_s > 3600
    # The run id keys the checkpoint directory, so a retry of the same run finds its checkpoints.
    assert (
        train["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"] == dsl.PIPELINE_JOB_ID_PLACEHOLDER
    )
    work_root = train["inputs"]["parameters"]["work_root"]["runtimeValue"]["constant"]
    assert work_root == default_config().pipeline.cache_mount
    assert default_config().train.resume == "latest"


def test_cache_pvc_is_mounted_where_snapshots_and_checkpoints_are_used(compiled):
    spec, k8s = compiled
    cfg = default_config().pipeline
    for task in ("cache-reward-models", "train", "evaluate", *REGISTRY_TASKS, "finalize-run"):
        (mount,) = k8s[f"exec-{task}"]["pvcMount"]
        assert mount["mountPath"] == cfg.cache_mount
        assert mount["pvcNameParameter"]["runtimeValue"]["constant"] == cfg.cache_pvc
    for task in ("cache-reward-models", "train"):
        work_root = dag_tasks(spec)[task]["inputs"]["parameters"]["work_root"]
        assert work_root["runtimeValue"]["constant"] == cfg.cache_mount


def test_secrets_are_injected_only_where_the_config_uses_them(tmp_path):
    cfg = load_config(
        REPO / "configs" / "sd35m-marble.yaml",
        [
            "pipeline.hub_token_secret=hf",
            "data.root=/mnt/marble-cache/data", "pipeline.dvc_secret=dvc", "pipeline.registry_token_secret=reg",
            "data.dvc.repo=https://git.example.com/team/prompts.git", "registry.tracking_uri=https://mlflow.example.com",
        ],
    )  # fmt: skip
    _, k8s = compile_docs(tmp_path, cfg)
    used = {
        task: {
            (s["secretName"], tuple(k["secretKey"] for k in s["keyToEnv"])) for s in ex.get("secretAsEnv", [])
        }
        for task, ex in k8s.items()
        if ex.get("secretAsEnv")
    }
    hub, dvc = ("hf", ("HF_TOKEN",)), ("dvc", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
    assert used == {
        "exec-fingerprint-inputs": {hub, dvc},
        "exec-prepare-prompts": {dvc},
        "exec-cache-reward-models": {hub},
        **{f"exec-{task}": {("reg", ("MLFLOW_TRACKING_TOKEN",))} for task in REGISTRY_TASKS},
    }
    for ex in k8s.values():
        for secret in ex.get("secretAsEnv", []):
            assert all(
                k["envVar"] == k["secretKey"] and ENV_NAME.match(k["envVar"]) for k in secret["keyToEnv"]
            )
    # Without data.dvc the DVC secret is not injected (nothing would read it).
    _, k8s = compile_docs(
        tmp_path / "b",
        load_config(
            REPO / "configs" / "sd35m-marble.yaml",
            ["pipeline.dvc_secret=dvc", "pipeline.hub_token_secret=null", "data.root=/d"],
        ),
    )
    assert not any(ex.get("secretAsEnv") for ex in k8s.values())


def _walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}.{i}")
    else:
        yield path, node


def test_no_parameter_name_or_default_looks_like_a_secret(compiled):
    spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in params:
        assert not SECRETISH.search(name), f"pipeline parameter {name!r} looks like a secret"
    scanned = {n: p.get("defaultValue") for n, p in params.items()}
    # The compiled-in Kubernetes section travels as a constant of the validation task.
    scanned["kubernetes"] = validate_task(spec)["inputs"]["parameters"]["kubernetes"]["runtimeValue"]
    for path, value in _walk(scanned):
        leaf = path.rsplit(".", 1)[-1]
        assert not (isinstance(value, str) and CREDENTIAL_VALUE.search(value)), f"{path} holds a credential"
        if SECRETISH.search(leaf):
            # Only references are allowed: a Kubernetes secret's name or an environment variable's name.
            ok = (leaf.endswith("_secret") and K8S_NAME.match(str(value))) or (
                leaf.endswith("_env") and ENV_NAME.match(str(value))
            )
            assert ok, f"{path}={value!r} looks like a secret value in a pipeline parameter"


def test_secret_scan_catches_a_token_in_the_config(tmp_path):
    # The check above must be able to fail: a config carrying a token value in a free-text field.
    cfg = default_config()
    cfg.run_name = "hf_" + "a" * 30
    spec, _ = compile_docs(tmp_path, cfg)
    default = spec["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    assert any(isinstance(v, str) and CREDENTIAL_VALUE.search(v) for _, v in _walk(default))


def test_local_variant_runs_lightweight_without_retries_or_kfp_install(tmp_path):
    from kfp import compiler

    out = tmp_path / "local.yaml"
    compiler.Compiler().compile(build_pipeline(default_config(), containerized=False), str(out))
    spec = next(yaml.safe_load_all(out.read_text()))
    assert "retryPolicy" not in dag_tasks(spec)["train"]
    # Locally, reward snapshots and checkpoints stay inside the task artifacts.
    assert dag_tasks(spec)["train"]["inputs"]["parameters"]["work_root"] == {"runtimeValue": {"constant": ""}}
    for ex in spec["deploymentSpec"]["executors"].values():
        text = " ".join(ex["container"]["command"])
        assert "ephemeral_component.py" in text and "pip install" not in text


def test_a_null_that_differs_from_the_default_is_refused_with_its_field(tmp_path):
    cfg = default_config()
    assert config_dict(cfg)  # the shipped config travels
    cfg.balancer = {"kind": "marble", "ema_decay": None}  # the marble preset's default is 0.7
    with pytest.raises(ConfigError, match="balancer.ema_decay"):
        config_dict(cfg)


def test_the_model_lock_travels_with_the_config_and_its_hash_is_recorded(tmp_path):
    from marble.hub.lock import LockedFile, LockedModel, ModelLock

    files = {"model.safetensors": LockedFile(size=3, sha256="ab" * 32)}
    lock = ModelLock(config="x.yaml", models={"org/m": LockedModel(revision="c1", source="hub", files=files)})
    out = compile_pipeline(default_config(), tmp_path / "p.yaml", lock=lock)
    spec, _ = yaml.safe_load_all(out.read_text())
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["model_lock_sha256"]["defaultValue"] == lock.sha256  # the compiled pipeline records it
    assert params["model_lock"]["defaultValue"] == lock.to_dict()
    tasks = all_tasks(spec)
    # The stages run inside the exit handler's sub-DAG, which receives the run parameters as channels.
    handler = spec["root"]["dag"]["tasks"]["exit-handler-1"]["inputs"]["parameters"]
    for name in ("model_lock", "model_lock_sha256"):
        assert handler[f"pipelinechannel--{name}"] == {"componentInputParameter": name}
    for task in ("cache-reward-models", "train", "evaluate"):
        inputs = tasks[task]["inputs"]["parameters"]
        assert inputs["model_lock"] == {"componentInputParameter": "pipelinechannel--model_lock"}, task
        assert inputs["model_lock_sha256"] == {
            "componentInputParameter": "pipelinechannel--model_lock_sha256"
        }, task
    for task in ("train", "evaluate"):  # the cache manifest's hash as the cache task reported it
        ref = tasks[task]["inputs"]["parameters"]["reward_cache_sha256"]["taskOutputParameter"]
        assert ref == {"producerTask": "cache-reward-models", "outputParameterKey": "manifest_sha256"}
