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
    prepare_prompts,
    register_adapter,
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
    for name in ("prepare_prompts", "cache_reward_models", "train", "evaluate", "register_adapter"):

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
    return adapter


@pytest.mark.parametrize("work_root", ["", "pvc"])
def test_train_publishes_the_adapter_and_keys_checkpoints_by_run(config, calls, tmp_path, work_root):
    calls.impl["train"] = _fake_train
    root = str(tmp_path / work_root) if work_root else ""
    adapter = art(dsl.Model, tmp_path / "task" / "adapter")
    result = train.component.python_func(
        config=config,
        prompts=art(dsl.Dataset, tmp_path / "prompts"),
        reward_cache_dir=str(tmp_path / "cache"),
        reward_cache_sha256="ab" * 32,
        **NO_LOCK,
        work_root=root,
        run_id="run-123",
        launch=IN_PROCESS,
        adapter=adapter,
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
        adapter=art(dsl.Model, tmp_path / "t" / "adapter"),
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


def test_register_records_scalars_in_the_artifact(config, calls, tmp_path):
    record = {"version": "3", "alias": "candidate", "promoted": False, "metrics": {"a": 1}}
    calls.impl["register_adapter"] = lambda cfg, adapter, eval_dir, out, registry_dir=None: record
    registration = art(dsl.Artifact, tmp_path / "registration")
    register_adapter.component.python_func(
        config=config,
        work_root="",
        adapter=art(dsl.Model, tmp_path / "adapter"),
        evaluation=art(dsl.Artifact, tmp_path / "evaluation"),
        registration=registration,
    )
    (_, adapter, eval_dir, out), _ = calls.args["register_adapter"]
    assert (adapter, eval_dir, out) == (
        tmp_path / "adapter",
        tmp_path / "evaluation",
        tmp_path / "registration",
    )
    assert registration.metadata == {"version": "3", "alias": "candidate", "promoted": False}


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


def test_register_keeps_the_embedded_store_on_the_pvc_between_runs(config, calls, tmp_path):
    calls.impl["register_adapter"] = lambda cfg, adapter, eval_dir, out, registry_dir=None: {"version": "1"}
    register_adapter.component.python_func(
        config=config,
        work_root=str(tmp_path / "pvc"),
        adapter=art(dsl.Model, tmp_path / "adapter"),
        evaluation=art(dsl.Artifact, tmp_path / "evaluation"),
        registration=art(dsl.Artifact, tmp_path / "registration"),
    )
    assert calls.args["register_adapter"][1] == {"registry_dir": tmp_path / "pvc" / "registry"}
