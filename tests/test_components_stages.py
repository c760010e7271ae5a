"""Each component's body, called through `component.python_func` with its stage function patched."""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

import pytest
from _eval_helpers import reward, scores, summary
from kfp import dsl
from pydantic import ValidationError

import marble.stages
from components import (
    cache_reward_models,
    evaluate,
    finalize_run,
    gate,
    prepare_prompts,
    promote,
    record_candidate,
    train,
    validate_config,
)
from components._io import publish_dir, scalar_metadata
from marble.config import MarbleConfig
from marble.configio import ConfigError, load_config
from marble.runparams import (
    RUN_PARAMETER_NAMES,
    RUN_PARAMETERS,
    kubernetes_section,
    override_parameter,
    run_parameter_values,
)

REPO = Path(__file__).resolve().parents[1]
NO_LOCK = {"model_lock": {}, "model_lock_sha256": ""}


@pytest.fixture(scope="module")
def config() -> dict:
    return load_config(REPO / "configs" / "tiny.yaml").model_dump(mode="json")


@pytest.fixture
def calls(monkeypatch):
    """Patch every stage with a recorder; tests add behaviour through `calls.impl[name]`."""

    class Recorder:
        def __init__(self):
            self.args: dict[str, tuple] = {}
            self.impl: dict = {}

    rec = Recorder()
    for name in ("prepare_prompts", "cache_reward_models", "train", "evaluate", "gate", "register_adapter"):

        def fake(*args, _name=name, **kwargs):
            rec.args[_name] = (args, kwargs)
            return rec.impl[_name](*args, **kwargs)

        monkeypatch.setattr(marble.stages, name, fake)
    return rec


def art(cls, path: Path):
    return cls(name=path.name, uri=str(path))


def test_validate_config_takes_exactly_the_run_parameters_of_the_table():
    inputs = validate_config.component.component_spec.inputs
    assert set(inputs) == {*RUN_PARAMETER_NAMES, "config", "kubernetes"}
    python_types = {"Integer": int, "Float": float, "String": str}
    for p in RUN_PARAMETERS:
        assert python_types[inputs[p.name].type] is p.type, p.name


def test_validate_config_applies_the_parameters_and_shows_them(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    run_config = art(dsl.Markdown, tmp_path / "run_config")
    values = {**run_parameter_values(cfg), "epochs": 3}
    out = validate_config.component.python_func(
        config=override_parameter(cfg), kubernetes=kubernetes_section(cfg), run_config=run_config, **values
    )
    resolved = MarbleConfig.model_validate(out.config)
    assert resolved.train.epochs == 3 and resolved.pipeline == cfg.pipeline
    assert out.config_hash == resolved.config_hash() == run_config.metadata["config_hash"]
    text = Path(run_config.path).read_text()
    assert "| `epochs` | 3 | `train.epochs` |" in text and "replaces the config's 40" in text


def test_validate_config_fails_naming_the_parameter_and_field(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    run_config = art(dsl.Markdown, tmp_path / "run_config")
    values = {**run_parameter_values(cfg), "lr": -1.0}
    with pytest.raises(ConfigError, match=r"run parameter lr \(train.lr\): Input should be greater than 0"):
        validate_config.component.python_func(
            config=override_parameter(cfg),
            kubernetes=kubernetes_section(cfg),
            run_config=run_config,
            **values,
        )
    assert not Path(run_config.path).exists()


def test_prepare_validates_then_writes_into_the_dataset(config, calls, tmp_path):
    def impl(cfg, out):
        out.mkdir()
        (out / "manifest.json").write_text("{}")
        return out / "manifest.json"

    calls.impl["prepare_prompts"] = impl
    prompts = art(dsl.Dataset, tmp_path / "prompts")
    prepare_prompts.component.python_func(config=config, data_fingerprint="d1", prompts=prompts)
    (cfg, out), _ = calls.args["prepare_prompts"]
    assert isinstance(cfg, MarbleConfig) and cfg.run_name == config["run_name"]
    assert out == tmp_path / "prompts"
    assert prompts.metadata == {
        "config_hash": cfg.config_hash(),
        "manifest": "manifest.json",
        "data_fingerprint": "d1",
    }


def test_an_invalid_config_fails_before_the_stage_runs(config, calls, tmp_path):
    bad = {**config, "nft": {**config["nft"], "beta": -1.0}}
    with pytest.raises(ValidationError, match="beta"):
        prepare_prompts.component.python_func(
            config=bad, data_fingerprint="d1", prompts=art(dsl.Dataset, tmp_path / "p")
        )
    assert "prepare_prompts" not in calls.args


def _write_manifest(cfg, out, *, lock=None, write_lock=None):
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text('{"files": []}')
    return out / "manifest.json"


def test_cache_rewards_locally_keeps_snapshots_in_the_artifact(config, calls, tmp_path):
    calls.impl["cache_reward_models"] = _write_manifest
    cache = art(dsl.Artifact, tmp_path / "reward_cache")
    result = cache_reward_models.component.python_func(
        config=config, work_root="", models_fingerprint="m1", reward_cache=cache, **NO_LOCK
    )
    assert result.cache_dir == str(tmp_path / "reward_cache")
    assert (tmp_path / "reward_cache" / "manifest.json").is_file()
    assert result.manifest_sha256 == cache.metadata["manifest_sha256"] == sha256(b'{"files": []}').hexdigest()
    # no lock given: the first run writes the lock of what it cached into its artifact
    assert calls.args["cache_reward_models"][1] == {
        "lock": None,
        "write_lock": Path(cache.path) / "model.lock.yaml",
    }


def test_cache_rewards_passes_the_lock_and_refuses_one_that_is_not_the_recorded_one(config, calls, tmp_path):
    from marble.errors import LockError
    from marble.hub.lock import ModelLock
    from marble.model_cache import lock_parameters

    calls.impl["cache_reward_models"] = _write_manifest
    lock = ModelLock(config="tiny.yaml")
    cache = art(dsl.Artifact, tmp_path / "reward_cache")
    params = lock_parameters(lock)
    cache_reward_models.component.python_func(
        config=config, work_root="", models_fingerprint="m1", reward_cache=cache, **params
    )
    assert calls.args["cache_reward_models"][1] == {"lock": lock}
    assert cache.metadata["model_lock_sha256"] == lock.sha256
    with pytest.raises(LockError, match="not the lock model_lock_sha256 records"):
        cache_reward_models.component.python_func(
            config=config,
            work_root="",
            models_fingerprint="m1",
            reward_cache=cache,
            model_lock=params["model_lock"],
            model_lock_sha256="0" * 64,
        )


def test_cache_rewards_on_a_cluster_writes_to_the_pvc_and_keeps_the_manifest(config, calls, tmp_path):
    calls.impl["cache_reward_models"] = _write_manifest
    pvc = tmp_path / "pvc"
    cache = art(dsl.Artifact, tmp_path / "reward_cache")
    result = cache_reward_models.component.python_func(
        config=config, work_root=str(pvc), models_fingerprint="m1", reward_cache=cache, **NO_LOCK
    )
    assert result.cache_dir == str(pvc / "reward-cache")
    assert (pvc / "reward-cache" / "manifest.json").is_file()
    assert (tmp_path / "reward_cache" / "manifest.json").read_text() == '{"files": []}'
    assert cache.metadata["cache_dir"] == str(pvc / "reward-cache")


IN_PROCESS = {
    "kind": "process",
    "nodes": 1.0,
    "procs_per_node": 1.0,
    "command": [],
}  # floats: protobuf Struct


def _fake_train(cfg, prompts_dir, out_dir, *, reward_cache=None, lock=None, reward_cache_sha256=None):
    adapter = Path(out_dir) / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    (Path(out_dir) / "checkpoints").mkdir()
    summary = {"reward_first": {"b": 0.1}, "reward_last": {"b": 0.3}, "alpha": {"b": [None, 0.5, 1.0]},
               "steps": 3, "train_seconds": 6.0, "skipped_steps": 1}  # fmt: skip
    (Path(out_dir) / "train_summary.json").write_text(json.dumps(summary))
    (Path(out_dir) / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/reward/b": 0.1}) + "\n")
    return adapter


def train_outputs(tmp_path: Path) -> dict:
    return {
        "adapter": art(dsl.Model, tmp_path / "task" / "adapter"),
        "metrics": art(dsl.Metrics, tmp_path / "task" / "metrics"),
        "training_curves": art(dsl.HTML, tmp_path / "task" / "training_curves"),
        "mlpipeline_ui_metadata": art(dsl.Artifact, tmp_path / "task" / "mlpipeline_ui_metadata"),
    }


@pytest.mark.parametrize("work_root", ["", "pvc"])
def test_train_publishes_the_adapter_and_keys_checkpoints_by_run(config, calls, tmp_path, work_root):
    calls.impl["train"] = _fake_train
    root = str(tmp_path / work_root) if work_root else ""
    outs = train_outputs(tmp_path)
    adapter = outs["adapter"]
    result = train.component.python_func(
        config=config,
        prompts=art(dsl.Dataset, tmp_path / "prompts"),
        reward_cache_dir=str(tmp_path / "cache"),
        reward_cache_sha256="ab" * 32,
        **NO_LOCK,
        work_root=root,
        run_id="run-123",
        launch=IN_PROCESS,
        tensorboard_pvc="marble-cache" if work_root else "",
        **outs,
    )
    (_, prompts_dir, out_dir), kwargs = calls.args["train"]
    expected = (
        (tmp_path / "pvc" / "runs" / "run-123" / "train") if work_root else (tmp_path / "task" / "train")
    )
    assert out_dir == expected and result.train_dir == str(expected)
    assert prompts_dir == tmp_path / "prompts"
    assert kwargs == {"reward_cache": str(tmp_path / "cache"), "lock": None, "reward_cache_sha256": "ab" * 32}
    # Only the exported adapter is published, not the checkpoints.
    assert sorted(p.name for p in Path(adapter.path).iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert adapter.metadata["lora_rank"] == config["lora"]["rank"]
    # The run view: final training numbers, the curves, and TensorBoard on the run's event files.
    assert outs["metrics"].metadata == {
        "reward/b": 0.3, "reward_change/b": pytest.approx(0.2), "alpha/b": 1.0, "steps": 3.0,
        "skipped_steps": 1.0, "seconds_per_step": 2.0,
    }  # fmt: skip
    assert "<img" in Path(outs["training_curves"].path).read_text()
    (viewer,) = json.loads(Path(outs["mlpipeline_ui_metadata"].path).read_text())["outputs"]
    if work_root:
        assert viewer["source"] == "volume://marble-cache/runs/run-123/train/tensorboard"
        volume = viewer["pod_template_spec"]["spec"]["volumes"][0]
        assert volume == {"name": "marble-cache", "persistentVolumeClaim": {"claimName": "marble-cache"}}
    else:
        assert viewer["source"] == str(expected / "tensorboard")


def test_train_without_a_reward_cache_passes_none(config, calls, tmp_path):
    calls.impl["train"] = _fake_train
    train.component.python_func(
        config=config,
        prompts=art(dsl.Dataset, tmp_path / "prompts"),
        reward_cache_dir="",
        reward_cache_sha256="",
        **NO_LOCK,
        work_root="",
        run_id="r",
        launch=IN_PROCESS,
        tensorboard_pvc="",
        **train_outputs(tmp_path),
    )
    assert calls.args["train"][1] == {"reward_cache": None, "lock": None, "reward_cache_sha256": None}


def _fake_evaluate(
    cfg,
    prompts_dir,
    adapter_dir,
    out_dir,
    *,
    reward_cache=None,
    lock=None,
    reward_cache_sha256=None,
    train_dir=None,
):
    out_dir.mkdir(parents=True)
    nan = float("nan")
    rewards = {
        "brightness": reward(0.1, (0.05, 0.15), 0.5),
        "ocr": reward(nan, (nan, nan), nan, n=0),  # scored no prompt: not a Kubeflow metric
    }
    ev = summary(scores(rewards, {"dark_fraction": 0.1}))
    ev.write(out_dir / "eval.json")
    (out_dir / "metrics.json").write_text(json.dumps(ev.flat_metrics()))
    (out_dir / "report.html").write_text("<html>r</html>")
    (out_dir / "report.md").write_text("# r")
    return out_dir / "metrics.json"


def test_evaluate_publishes_metrics_and_report(config, calls, tmp_path):
    calls.impl["evaluate"] = _fake_evaluate
    (tmp_path / "train").mkdir()
    outs = {
        "evaluation": art(dsl.Artifact, tmp_path / "evaluation"),
        "metrics": art(dsl.Metrics, tmp_path / "metrics"),
        "report_html": art(dsl.HTML, tmp_path / "report_html"),
        "report_md": art(dsl.Markdown, tmp_path / "report_md"),
    }
    evaluate.component.python_func(
        config=config,
        prompts=art(dsl.Dataset, tmp_path / "prompts"),
        adapter=art(dsl.Model, tmp_path / "adapter"),
        reward_cache_dir="",
        reward_cache_sha256="",
        **NO_LOCK,
        train_dir=str(tmp_path / "train"),
        **outs,
    )
    (_, prompts, adapter, out), kwargs = calls.args["evaluate"]
    assert (prompts, adapter, out) == (tmp_path / "prompts", tmp_path / "adapter", tmp_path / "evaluation")
    assert kwargs == {
        "reward_cache": None,
        "lock": None,
        "reward_cache_sha256": None,
        "train_dir": str(tmp_path / "train"),
    }
    logged = outs["metrics"].metadata
    assert logged["adapter/brightness"] == pytest.approx(0.5) and logged["delta/brightness"] == pytest.approx(
        0.1
    )
    assert logged["gate_preview/passed"] in (0.0, 1.0) and logged[
        "monitor/shift/dark_fraction"
    ] == pytest.approx(0.1)
    assert "adapter/ocr" not in logged  # NaN: left in eval.json
    assert Path(outs["report_html"].path).read_text() == "<html>r</html>"
    assert Path(outs["report_md"].path).read_text() == "# r"


def test_evaluate_skips_a_missing_train_dir(config, calls, tmp_path):
    calls.impl["evaluate"] = _fake_evaluate
    evaluate.component.python_func(
        config=config,
        prompts=art(dsl.Dataset, tmp_path / "prompts"),
        adapter=art(dsl.Model, tmp_path / "adapter"),
        reward_cache_dir="",
        reward_cache_sha256="",
        **NO_LOCK,
        train_dir=str(tmp_path / "gone"),
        evaluation=art(dsl.Artifact, tmp_path / "evaluation"),
        metrics=art(dsl.Metrics, tmp_path / "metrics"),
        report_html=art(dsl.HTML, tmp_path / "h"),
        report_md=art(dsl.Markdown, tmp_path / "m"),
    )
    assert calls.args["evaluate"][1]["train_dir"] is None


def test_gate_outputs_the_decision_the_pipeline_branches_on(config, calls, tmp_path):
    decision = {"decision": "candidate", "passed": False, "summary": "failed: regression/b: drop",
                "checks": [{"rule": "regression", "subject": "b", "passed": False, "detail": "drop"},
                           {"rule": "improvement", "subject": "*", "passed": True, "detail": "up"}],
                "champion_before": "2", "key": "k", "version": None}  # fmt: skip
    calls.impl["gate"] = lambda promotion, out: decision
    outs = {
        "gate_decision": art(dsl.Artifact, tmp_path / "gate_decision"),
        "gate_report": art(dsl.Markdown, tmp_path / "gate_report"),
        "metrics": art(dsl.Metrics, tmp_path / "metrics"),
    }
    result = gate.component.python_func(
        config=config,
        work_root="",
        adapter=art(dsl.Model, tmp_path / "adapter"),
        evaluation=art(dsl.Artifact, tmp_path / "evaluation"),
        **outs,
    )
    assert result.decision == "candidate"
    (promotion, out), _ = calls.args["gate"]
    assert promotion.registry_dir is None
    assert (promotion.adapter_dir, promotion.eval_dir, out) == (
        tmp_path / "adapter",
        tmp_path / "evaluation",
        tmp_path / "gate_decision",
    )
    assert outs["metrics"].metadata == {"gate/passed": 0.0, "gate/checks": 2.0, "gate/failed_checks": 1.0}
    report = Path(outs["gate_report"].path).read_text()
    assert "failed: record as `candidate`" in report and "| regression | b | **no** | drop |" in report
    assert "champion version 2" in report


@pytest.mark.parametrize(("component", "expected"), [(promote, "champion"), (record_candidate, "candidate")])
def test_each_branch_registers_and_shows_the_decision_and_link(config, calls, tmp_path, component, expected):
    record = {"version": "3", "model_name": "marble-lora", "gate_passed": expected == "champion",
              "gate_summary": "s", "created": True, "champion": "3" if expected == "champion" else None,
              "candidate": None, "metrics": {"a": 1}}  # fmt: skip
    calls.impl["register_adapter"] = lambda promotion, out: record
    outs = {
        "registration": art(dsl.Artifact, tmp_path / "registration"),
        "registration_report": art(dsl.Markdown, tmp_path / "report"),
        "metrics": art(dsl.Metrics, tmp_path / "metrics"),
    }
    component.component.python_func(
        config=config,
        work_root="",
        adapter=art(dsl.Model, tmp_path / "adapter"),
        evaluation=art(dsl.Artifact, tmp_path / "evaluation"),
        **outs,
    )
    (promotion, out), _ = calls.args["register_adapter"]
    assert (promotion.adapter_dir, promotion.eval_dir, out) == (
        tmp_path / "adapter",
        tmp_path / "evaluation",
        tmp_path / "registration",
    )
    meta = outs["registration"].metadata
    assert meta["alias"] == expected and meta["version"] == "3"
    assert meta["registry_link"] == "models:/marble-lora/3 (embedded store in the registration artifact)"
    assert outs["metrics"].metadata == {
        "promoted": float(expected == "champion"),
        "new_version": 1.0,
        "version": 3.0,
    }
    assert f"Registered as `{expected}`" in Path(outs["registration_report"].path).read_text()


def test_a_branch_whose_registration_disagrees_says_why(config, calls, tmp_path, caplog):
    # The champion moved between the gate task and registration: promote registered a candidate.
    record = {"version": "4", "model_name": "m", "gate_passed": False, "gate_summary": "failed: pareto/*",
              "created": True, "champion_before": "3"}  # fmt: skip
    calls.impl["register_adapter"] = lambda promotion, out: record
    report = art(dsl.Markdown, tmp_path / "report")
    promote.component.python_func(
        config=config,
        work_root="",
        adapter=art(dsl.Model, tmp_path / "adapter"),
        evaluation=art(dsl.Artifact, tmp_path / "evaluation"),
        registration=art(dsl.Artifact, tmp_path / "registration"),
        registration_report=report,
        metrics=art(dsl.Metrics, tmp_path / "metrics"),
    )
    text = Path(report.path).read_text()
    assert "Registered as `candidate`" in text and "the gate task decided 'champion'" in text
    assert "champion changed in between" in caplog.text


@pytest.mark.parametrize("state", ["SUCCEEDED", "FAILED"])
def test_finalize_records_the_final_status(tmp_path, state):
    status = dsl.PipelineTaskFinalStatus(
        state=state,
        pipeline_job_resource_name="projects/p/runs/r-1",
        pipeline_task_name="marble-run",
        error_code=None if state == "SUCCEEDED" else 1,
        error_message=None if state == "SUCCEEDED" else "Task train failed.",
    )
    run_status = art(dsl.Markdown, tmp_path / "run_status")
    finalize_run.component.python_func(
        status=status,
        work_root=str(tmp_path / "pvc"),
        run_id="r-1",
        delete_train_jobs=False,
        run_status=run_status,
    )
    record = json.loads((tmp_path / "pvc" / "runs" / "r-1" / "run_status.json").read_text())
    assert record["state"] == state and record["failed"] is (state == "FAILED")
    text = Path(run_status.path).read_text()
    assert (
        ("Run failed" in text and "Task train failed." in text)
        if state == "FAILED"
        else "Run succeeded" in text
    )


def test_publish_dir_replaces_the_destination(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "new.bin").write_bytes(b"1")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "stale.bin").write_bytes(b"0")
    publish_dir(tmp_path / "src", tmp_path / "dst")
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["new.bin"]
    assert publish_dir(tmp_path / "dst", tmp_path / "dst") == tmp_path / "dst"


def test_scalar_metadata_drops_nested_values():
    assert scalar_metadata({"a": 1, "b": [1], "c": {"d": 1}, "e": "x"}) == {"a": 1, "e": "x"}


def test_the_gate_and_its_branches_use_the_embedded_store_on_the_pvc(config, calls, tmp_path):
    """champion carries over between runs: the gate reads, and the branch registers in, <work_root>/registry."""
    decision = {"decision": "champion", "passed": True, "summary": "passed", "checks": [], "version": None}
    calls.impl["gate"] = lambda promotion, out: decision
    record = {"version": "1", "model_name": "marble-lora", "gate_passed": True, "created": True}
    calls.impl["register_adapter"] = lambda promotion, out: record
    inputs = {
        "adapter": art(dsl.Model, tmp_path / "adapter"),
        "evaluation": art(dsl.Artifact, tmp_path / "e"),
    }
    gate.component.python_func(
        config=config,
        work_root=str(tmp_path / "pvc"),
        gate_decision=art(dsl.Artifact, tmp_path / "gate_decision"),
        gate_report=art(dsl.Markdown, tmp_path / "gate_report"),
        metrics=art(dsl.Metrics, tmp_path / "gate_metrics"),
        **inputs,
    )
    registration = art(dsl.Artifact, tmp_path / "registration")
    promote.component.python_func(
        config=config,
        work_root=str(tmp_path / "pvc"),
        registration=registration,
        registration_report=art(dsl.Markdown, tmp_path / "report"),
        metrics=art(dsl.Metrics, tmp_path / "metrics"),
        **inputs,
    )
    store = tmp_path / "pvc" / "registry"
    (gate_promotion, _), _ = calls.args["gate"]
    (branch_promotion, _), _ = calls.args["register_adapter"]
    assert gate_promotion.registry_dir == branch_promotion.registry_dir == store
    assert registration.metadata["registry_link"] == f"models:/marble-lora/1 (embedded store {store})"


def test_finalize_deletes_a_multi_node_runs_jobs_and_fails_when_it_cannot(tmp_path, monkeypatch):
    import marble.cluster.train_task as train_task

    status = dsl.PipelineTaskFinalStatus(
        state="FAILED", pipeline_job_resource_name="r", pipeline_task_name="marble-run", error_code=1,
        error_message="Task evaluate failed.",
    )  # fmt: skip
    monkeypatch.setattr(train_task, "cleanup_run_jobs", lambda run_id: [f"marble-{run_id}"])
    run_status = art(dsl.Markdown, tmp_path / "run_status")
    finalize_run.component.python_func(
        status=status, work_root=str(tmp_path), run_id="r-2", delete_train_jobs=True, run_status=run_status
    )
    assert json.loads((tmp_path / "runs" / "r-2" / "run_status.json").read_text())["deleted_train_jobs"] == [
        "marble-r-2"
    ]

    def refused(run_id):
        raise PermissionError("pytorchjobs is forbidden")

    monkeypatch.setattr(train_task, "cleanup_run_jobs", refused)
    with pytest.raises(RuntimeError, match="deleting run r-3's PyTorchJobs failed: PermissionError"):
        finalize_run.component.python_func(
            status=status,
            work_root=str(tmp_path),
            run_id="r-3",
            delete_train_jobs=True,
            run_status=run_status,
        )
    # Recorded before failing: the run's end and why the cleanup failed.
    record = json.loads((tmp_path / "runs" / "r-3" / "run_status.json").read_text())
    assert record["state"] == "FAILED" and "forbidden" in record["cleanup_error"]
    assert "cleanup_error" in Path(run_status.path).read_text()
