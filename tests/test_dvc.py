"""dvc.yaml and params.yaml stay consistent with the CLI, the config schema and the stage paths.

The slow test runs the whole chain with `dvc repro` in a copy of the repository.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import typing
from pathlib import Path, PurePosixPath

import pytest
import yaml
from pydantic import BaseModel

from marble.cli import build_parser
from marble.config import MarbleConfig
from marble.configio import config_to_yaml, load_config, read_config_dict, validate_config
from marble.paths import stage_dirs

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "cache-rewards", "train", "evaluate", "register"]
STAGE_DIR_FIELD = {
    "prepare": "prompts",
    "cache-rewards": "reward_cache",
    "train": "train",
    "evaluate": "eval",
    "register": "registry",
}


@pytest.fixture(scope="module")
def dvc() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


@pytest.fixture(scope="module")
def params() -> dict:
    return read_config_dict(ROOT / "params.yaml")


def _under(path: str, parent: str) -> bool:
    p, q = PurePosixPath(path), PurePosixPath(parent)
    return p == q or q in p.parents


def _schema_has(model: type[BaseModel], parts: list[str]) -> bool:
    """Whether a dotted key path names a field of the config schema (descending through sub-models)."""
    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    if len(parts) == 1:
        return True
    candidates = [field.annotation, *typing.get_args(field.annotation)]
    subs = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
    return any(_schema_has(sub, parts[1:]) for sub in subs)


def _get(data: dict, parts: list[str]):
    for part in parts:
        if not isinstance(data, dict) or part not in data:
            raise KeyError(".".join(parts))
        data = data[part]
    return data


# ------------------------------------------------------------------------------------ params.yaml
def test_params_yaml_validates_and_is_the_dump_of_the_tiny_config(params):
    cfg = validate_config(params, "params.yaml")
    tiny = load_config(ROOT / "configs" / "tiny.yaml")
    assert cfg.model_dump(mode="json") == tiny.model_dump(mode="json"), (
        "params.yaml is stale: regenerate with `marble config show --config configs/tiny.yaml` (docs/data.md)"
    )
    # a full dump, not a partial file relying on defaults (DVC tracks the values it can see)
    assert params == yaml.safe_load(config_to_yaml(tiny))


# --------------------------------------------------------------------------------------- dvc.yaml
def test_dvc_has_the_five_stages_in_order(dvc):
    assert list(dvc["stages"]) == STAGES


@pytest.mark.parametrize("stage", STAGES)
def test_stage_cmd_is_a_real_cli_invocation_with_explicit_paths(dvc, params, stage):
    spec = dvc["stages"][stage]
    argv = shlex.split(spec["cmd"])
    assert argv[0] == "marble"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse exits on an unknown subcommand or flag
        pytest.fail(f"dvc.yaml stage {stage}: {spec['cmd']!r} is not a valid marble command ({exc})")
    assert args.command == stage
    assert args.config == "params.yaml"
    assert args.out, "every stage names its output directory explicitly"
    expected = stage_dirs(validate_config(params))
    assert PurePosixPath(args.out) == PurePosixPath(getattr(expected, STAGE_DIR_FIELD[stage]))
    assert _under(args.out, "outputs")
    # the stage declares what it writes, and everything it writes is under its --out
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in spec["outs"]]
    assert outs == [args.out]
    # paths handed to the command are declared deps
    deps = spec["deps"]
    for flag in ("prompts", "reward_cache", "adapter", "train_dir", "eval_dir"):
        value = getattr(args, flag, None)
        if value:
            assert any(_under(value, d) for d in deps), (
                f"{stage}: --{flag.replace('_', '-')} {value} is not in deps"
            )


@pytest.mark.parametrize("stage", STAGES)
def test_stage_params_exist_in_params_yaml_and_in_the_schema(dvc, params, stage):
    keys = dvc["stages"][stage]["params"]
    assert keys
    for key in keys:
        assert isinstance(key, str), f"{stage}: params come from params.yaml sections, got {key!r}"
        _get(params, key.split("."))  # KeyError names the missing key
        assert _schema_has(MarbleConfig, key.split(".")), f"{stage}: {key} is not a config field"


def test_schema_walk_refuses_unknown_keys():
    assert _schema_has(MarbleConfig, ["eval", "gate", "max_regression"])
    assert not _schema_has(MarbleConfig, ["eval", "gates"])
    assert not _schema_has(MarbleConfig, ["trainer"])


def test_deps_exist_or_are_produced_by_an_earlier_stage(dvc):
    produced: list[str] = []
    for stage in STAGES:
        spec = dvc["stages"][stage]
        for dep in spec["deps"]:
            made_earlier = any(_under(dep, out) for out in produced)
            assert made_earlier or (ROOT / dep).exists(), (
                f"{stage}: dep {dep} neither exists nor is produced earlier"
            )
        produced += [next(iter(o)) if isinstance(o, dict) else o for o in spec["outs"]]


MODEL_STAGES = ("cache-rewards", "train", "evaluate")
"""The stages that load a model (or snapshot one): the model lock is their dependency."""


@pytest.mark.parametrize("stage", STAGES)
def test_stages_that_load_models_depend_on_the_model_lock(dvc, stage):
    from marble.hub.lock import lock_path_for

    lock = lock_path_for("params.yaml").as_posix()
    assert (lock in dvc["stages"][stage]["deps"]) == (stage in MODEL_STAGES)


def test_the_committed_model_lock_covers_params_yaml_exactly(params):
    from marble.model_cache import check_lock

    report = check_lock(validate_config(params), ROOT / "params.yaml", None)
    assert "covers the 0 model repo(s)" in report  # the tiny world loads no hub model


def test_metrics_and_plots_point_into_stage_outputs_with_trained_reward_columns(dvc, params):
    stages = dvc["stages"]
    assert dvc["metrics"] == [f"{stages['evaluate']['outs'][0]}/metrics.json"]
    train_out = stages["train"]["outs"][0]
    cfg = validate_config(params)
    names = cfg.trained_reward_names
    expected = {
        "curves.csv": [f"train/reward/{n}" for n in names],
        "alpha.csv": [f"balance/alpha/{n}" for n in names],
    }
    seen = {}
    for plot in dvc["plots"]:
        ((_, spec),) = plot.items()
        assert spec["x"] == "step"
        for path, cols in spec["y"].items():
            assert PurePosixPath(path).parent == PurePosixPath(train_out)
            seen[PurePosixPath(path).name] = cols
    assert seen == expected


def test_dvcignore_skips_bytecode_but_never_outputs():
    lines = [ln.strip() for ln in (ROOT / ".dvcignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert "__pycache__/" in rules and "*.pyc" in rules
    assert not any(r.strip("/").startswith("outputs") for r in rules)


# ------------------------------------------------------------------------------------- dvc repro
def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    exe = shutil.which("dvc", path=env["PATH"])
    assert exe, "dvc is not installed in the environment"
    proc = subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_dvc_repro_runs_the_chain_then_is_a_no_op_then_reruns_only_dependants(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml", "params.lock.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, work / name)
    for name in ("marble", "configs"):
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    if (ROOT / ".cache").is_dir():  # reuse the built tiny model (cached by config hash)
        (work / ".cache").symlink_to(ROOT / ".cache")
    _dvc(work, "init", "--no-scm", "-q")

    first = _dvc(work, "repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout
    assert (work / "outputs/tiny/eval/metrics.json").is_file()

    second = _dvc(work, "repro")
    assert "Running stage" not in second.stdout, second.stdout

    metrics = json.loads(_dvc(work, "metrics", "show", "--json").stdout)
    assert metrics, "no metrics"
    plots = json.loads(_dvc(work, "plots", "show", "--json").stdout)
    assert {"reward_curves", "alpha_trajectories"} <= set(plots["data"]), plots.get("errors")
    assert not plots.get("errors"), plots["errors"]

    # one training param changes: prepare and cache-rewards are skipped, the rest re-runs
    data = yaml.safe_load((work / "params.yaml").read_text())
    data["train"]["lr"] = data["train"]["lr"] / 2
    (work / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    third = _dvc(work, "repro")
    for stage in ("prepare", "cache-rewards"):
        assert f"Running stage '{stage}'" not in third.stdout, third.stdout
    for stage in ("train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in third.stdout, third.stdout

    # a new model lock: every stage that loads a model is out of date, prepare is not
    lock = work / "params.lock.yaml"
    lock.write_text(lock.read_text().replace("models: {}", "models: {}\n# updated"))
    changed = json.loads(_dvc(work, "status", "--json").stdout)
    assert set(changed) == {"cache-rewards", "train", "evaluate"}, changed
