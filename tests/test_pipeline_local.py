"""The local pipeline run (kfp SubprocessRunner) as an integration test.

Fast variant (default suite): every stage function is replaced by a fake that writes small, checkable
files, in the task SUBPROCESSES too (through a `sitecustomize` module on PYTHONPATH), so the test checks
the wiring: the tasks run in order, artifacts flow between them, the adapter that train exported is the
one evaluated and registered, the gate's decision picks the branch, the exit handler records the end,
and `run_local` finds every output. The fake gate passes when the run parameter
`gate_max_monitor_shift` is at least 1, so a typed parameter steers the branch end to end.
Slow variant: the real stages on configs/tiny.yaml, as `make demo` runs them, once through each branch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import pytest

from marble.configio import load_config
from pipelines.local import LocalRunError, locate_outputs, run_local
from pipelines.views import load_spec, run_view, write_views

REPO = Path(__file__).resolve().parents[1]

FAKE_STAGES = textwrap.dedent(
    '''
    """Installed by tests/test_pipeline_local.py: fake marble stages for the local-runner wiring test."""
    import hashlib, json
    from pathlib import Path

    import marble.stages as S


    def _sha(path):
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()


    def prepare_prompts(cfg, out_dir):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            rec = {"id": split, "prompt": f"a red circle ({split})", "family": "color", "metadata": {}}
            (out / f"{split}.jsonl").write_text(json.dumps(rec) + "\\n")
        (out / "manifest.json").write_text(json.dumps({"config_hash": cfg.config_hash()}))
        return out / "manifest.json"


    def cache_reward_models(cfg, out_dir, *, lock=None, write_lock=None):
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text(json.dumps({"rewards": [r.name for r in cfg.rewards]}))
        return out / "manifest.json"


    def train(cfg, prompts_dir, out_dir, *, reward_cache=None, lock=None, reward_cache_sha256=None):
        from tqdm import tqdm
        for _ in tqdm(range(8), desc="train", unit="step", mininterval=0):
            pass
        assert (Path(prompts_dir) / "train.jsonl").is_file(), prompts_dir
        assert (Path(reward_cache) / "manifest.json").is_file(), reward_cache
        assert reward_cache_sha256 == _sha(Path(reward_cache) / "manifest.json"), reward_cache_sha256
        adapter = Path(out_dir) / "adapter"
        adapter.mkdir(parents=True)
        (adapter / "pytorch_lora_weights.safetensors").write_bytes(cfg.config_hash().encode() + Path(out_dir).name.encode())
        records = [{"step": s, "train/reward/brightness": 0.1 * s, "balance/alpha/brightness": 1.0,
                    "time/train_s": 0.5} for s in (1, 2, 3, 4)]
        (Path(out_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in records))
        summary = {"reward_first": {"brightness": 0.1}, "reward_last": {"brightness": 0.4},
                   "alpha": {"brightness": [1.0] * 4}, "steps": 4, "train_seconds": 8.0, "skipped_steps": 0}
        (Path(out_dir) / "train_summary.json").write_text(json.dumps(summary))
        return adapter


    def evaluate(cfg, prompts_dir, adapter_dir, out_dir, *, reward_cache=None, lock=None, reward_cache_sha256=None,
                 train_dir=None):
        assert (Path(prompts_dir) / "test.jsonl").is_file(), prompts_dir
        assert (Path(train_dir) / "metrics.jsonl").is_file(), train_dir
        from _eval_helpers import reward, scores, summary  # the evaluation contract, hand-filled

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sha = _sha(Path(adapter_dir) / "pytorch_lora_weights.safetensors")
        ev = summary(scores({"brightness": reward(0.25, (0.1, 0.4), 0.75)}, {}), adapter_sha256=sha)
        ev.write(out / "eval.json")
        (out / "metrics.json").write_text(json.dumps(ev.flat_metrics()))
        (out / "report.html").write_text("<html><body>report</body></html>")
        (out / "report.md").write_text("# report")
        return out / "metrics.json"


    def _passes(cfg):
        return cfg.eval.gate.max_monitor_shift >= 1.0


    def gate(promotion, out_dir):
        passed = _passes(promotion.cfg)
        decision = {"decision": "champion" if passed else "candidate", "passed": passed,
                    "summary": "passed" if passed else "failed: monitor/saturation: shift", "key": "k",
                    "checks": [{"rule": "monitor", "subject": "saturation", "passed": passed, "detail": "d"}],
                    "champion_before": None, "version": None}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "gate.json").write_text(json.dumps(decision))
        return decision


    def register_adapter(promotion, out_dir):
        cfg, adapter_dir = promotion.cfg, promotion.adapter_dir
        evaluated = json.loads((Path(promotion.eval_dir) / "eval.json").read_text())["lineage"]["adapter_sha256"]
        record = {"adapter_sha256": _sha(Path(adapter_dir) / "pytorch_lora_weights.safetensors"),
                  "evaluated_sha256": evaluated, "version": "1", "model_name": "marble-lora",
                  "gate_passed": _passes(cfg), "gate_summary": "fake", "created": True,
                  "champion": "1" if _passes(cfg) else None, "candidate": None if _passes(cfg) else "1"}
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "registration.json").write_text(json.dumps(record))
        return record


    for _name in ("prepare_prompts", "cache_reward_models", "train", "evaluate", "gate", "register_adapter"):
        setattr(S, _name, globals()[_name])
    '''
)


@pytest.fixture
def fake_stages(tmp_path, monkeypatch):
    """Fake stages in this process and in every task subprocess (which inherit PYTHONPATH)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_STAGES)
    shutil.copy(REPO / "tests" / "_eval_helpers.py", site)  # the fake evaluate writes a real eval.json
    monkeypatch.setenv("PYTHONPATH", str(site))
    return site


def executor_output(run_dir: Path, task: str) -> dict:
    return json.loads((run_dir / task / "executor_output.json").read_text())


def logged_metrics(run_dir: Path, task: str, output: str = "metrics") -> dict:
    """A Metrics artifact's values: in the task's executor output (kfp writes no file for it)."""
    return executor_output(run_dir, task)["artifacts"][output]["artifacts"][0]["metadata"]


def test_local_run_wires_every_task_and_takes_the_passing_branch(fake_stages, tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    out = run_local(cfg, pipeline_root=tmp_path / "kfp", params={"gate_max_monitor_shift": 1.0})

    adapter_file = out.adapter / "pytorch_lora_weights.safetensors"
    adapter_sha = hashlib.sha256(adapter_file.read_bytes()).hexdigest()
    record = json.loads(out.registration.read_text())
    # The adapter train exported is the one evaluated and the one registered.
    assert record["adapter_sha256"] == adapter_sha
    assert record["evaluated_sha256"] == adapter_sha
    assert (out.prompts / "train.jsonl").is_file()
    assert (out.reward_cache / "manifest.json").is_file()
    assert out.report_html.read_text().startswith("<html>")
    assert out.report_md.read_text() == "# report"
    assert json.loads(out.metrics.read_text())["gate_preview/passed"] == 1.0
    # The gate branch: promote ran, record-candidate did not.
    assert out.decision == "champion"
    assert out.registration.parent.parent.name == "promote"
    assert not (out.run_dir / "record-candidate").exists()
    assert executor_output(out.run_dir, "gate")["parameterValues"]["decision"] == "champion"
    # The run view: metrics of train, evaluate, gate and the registering branch.
    assert logged_metrics(out.run_dir, "train") == {
        "reward/brightness": 0.4, "reward_change/brightness": pytest.approx(0.3), "alpha/brightness": 1.0,
        "steps": 4.0, "skipped_steps": 0.0, "seconds_per_step": 2.0, "update_seconds_per_step": 0.5,
    }  # fmt: skip
    # The Metrics artifact's values are in the task's executor output (kfp writes no file for it).
    assert logged_metrics(out.run_dir, "evaluate")["delta/brightness"] == 0.25
    assert logged_metrics(out.run_dir, "evaluate")["gate_preview/passed"] == 1.0
    assert logged_metrics(out.run_dir, "gate")["gate/passed"] == 1.0
    assert logged_metrics(out.run_dir, "promote")["promoted"] == 1.0
    report = (out.run_dir / "promote" / "registration_report").read_text()
    assert "Registered as `champion`" in report and "models:/marble-lora/1" in report
    ui = json.loads((out.run_dir / "train" / "mlpipeline_ui_metadata").read_text())
    assert ui["outputs"][0]["type"] == "tensorboard"
    # The exit handler ran last and recorded success.
    assert "Run succeeded" in (out.run_dir / "finalize-run" / "run_status").read_text()
    summary = out.summary()
    for path in (out.adapter, out.report_html, out.metrics, out.registration, out.log):
        assert str(path) in summary


# With the default gate tolerances the fake gate fails: the record-candidate branch runs.
TASKS = (
    "validate-config", "fingerprint-inputs", "prepare-prompts", "cache-reward-models", "train", "evaluate", "gate",
    "record-candidate", "finalize-run",
)  # fmt: skip


@pytest.mark.slow  # a whole local pipeline run, about 45 s on the 2-core machine: `make test-slow`
def test_local_run_shows_tasks_and_progress_and_logs_the_rest(fake_stages, tmp_path, capsys):
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    out = run_local(cfg, pipeline_root=tmp_path / "kfp")
    shown = capsys.readouterr()
    lines = shown.out.splitlines()
    for task in TASKS:
        assert sum(line.endswith(f"start  {task}") for line in lines) == 1, shown.out
        assert sum(f"end    {task}: SUCCESS in " in line for line in lines) == 1, shown.out
    bars = [line for line in lines if line.startswith("train:")]
    assert bars[0].startswith("train:   0%|") and bars[-1].startswith("train: 100%|")
    assert len(bars) <= 5  # not a terminal: the bar at each quarter, not at every refresh
    assert str(out.log) in lines[0]
    assert len(lines) == 1 + 2 * len(TASKS) + len(bars), shown.out
    assert "executor" not in "\n".join(lines[1:]).lower() and shown.err == ""
    # The log keeps everything: kfp's executor input JSON and every bar refresh.
    log = out.log.read_text()
    assert "Got executor_input:" in log and '"outputFile"' in log
    assert sum(line.strip().startswith("train:") for line in log.splitlines()) > len(bars)


@pytest.mark.slow  # a whole local pipeline run, about 45 s on the 2-core machine: `make test-slow`
def test_a_failing_gate_records_a_candidate(fake_stages, tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    out = run_local(cfg, pipeline_root=tmp_path / "kfp", params={"gate_max_monitor_shift": 0.5})
    assert out.decision == "candidate"
    assert out.registration.parent.parent.name == "record-candidate"
    assert not (out.run_dir / "promote").exists()
    assert logged_metrics(out.run_dir, "record-candidate")["promoted"] == 0.0
    assert "failed" in (out.run_dir / "gate" / "gate_report").read_text()
    # What docs/kubeflow.md shows is rendered from these artifacts: the branch taken, the one skipped.
    view = run_view(out.run_dir, load_spec(REPO / "pipelines" / "marble_pipeline.yaml"))
    promote = view.index("## promote\n")
    assert (
        view[promote:]
        .split("## ", 2)[1]
        .strip()
        .endswith("Not run (a branch not taken, or an upstream task failed).")
    )
    assert 'Output parameters: `{"decision": "candidate"}`' in view
    assert "#### Promotion gate failed: record as `candidate`" in view
    assert "#### Registered as `candidate`" in view
    assert "| `promoted` | 0 |" in view and "| `gate/passed` | 0 |" in view
    assert str(out.run_dir.resolve()) not in view and "$RUN_DIR/" in view  # the page names no machine path
    written = write_views(REPO / "pipelines" / "marble_pipeline.yaml", tmp_path / "docs", [out.run_dir])
    assert tmp_path / "docs" / "run-view-candidate.md" in written
    assert (tmp_path / "docs" / "training-curves-candidate.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # a whole local pipeline run, about 45 s on the 2-core machine: `make test-slow`
def test_local_run_reports_a_failing_task(fake_stages, tmp_path, capsys):
    # Make the fake train stage fail: the run must stop with a LocalRunError, not a traceback.
    (fake_stages / "sitecustomize.py").write_text(
        FAKE_STAGES + "\ndef _broken(*a, **k):\n    raise RuntimeError('boom')\nS.train = _broken\n"
    )
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    with pytest.raises(LocalRunError, match="failed"):
        run_local(cfg, pipeline_root=tmp_path / "kfp")
    (run_dir,) = [p for p in (tmp_path / "kfp").iterdir() if p.name != "logs"]
    assert not (run_dir / "gate").exists() and not (run_dir / "promote").exists()
    # The failed task's traceback, kept in the log, is shown on the terminal too.
    assert "RuntimeError: boom" in capsys.readouterr().out
    # The exit handler still ran, after the failure, and recorded it.
    assert "Run failed" in (run_dir / "finalize-run" / "run_status").read_text()


def test_a_bad_run_parameter_fails_the_first_task_naming_the_field(fake_stages, tmp_path, capfd):
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    with pytest.raises(LocalRunError, match="validate-config"):
        run_local(cfg, pipeline_root=tmp_path / "kfp", params={"lr": -1.0})
    # kfp streams the task's output, traceback included, to the console.
    shown = "".join(capfd.readouterr())
    assert "run parameter lr (train.lr): Input should be greater than 0" in shown
    (run_dir,) = [p for p in (tmp_path / "kfp").iterdir() if p.name != "logs"]
    assert not (run_dir / "prepare-prompts").exists() and not (run_dir / "train").exists()


def test_locate_outputs_names_what_is_missing(tmp_path):
    with pytest.raises(LocalRunError, match="registration.json"):
        locate_outputs(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("params", "decision"),
    [
        # Loose tolerances: only the improvement check (a trained reward's CI above 0) can stop it.
        (
            {
                "gate_max_regression": 100.0,
                "gate_max_held_out_regression": 100.0,
                "gate_max_monitor_shift": 100.0,
            },
            "champion",
        ),
        # No monitor may move at all: any trained adapter changes the images, so the gate fails.
        ({"gate_max_monitor_shift": 0.0, "epochs": 10}, "candidate"),
    ],
    ids=["gate-passes", "gate-fails"],
)
def test_real_local_run_on_the_tiny_config(tmp_path, params, decision):
    """What `make demo` does: the real stages, tiny world, SubprocessRunner, through each gate branch."""
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    out = run_local(cfg, pipeline_root=tmp_path / "kfp", params=params)
    adapter_file = out.adapter / "pytorch_lora_weights.safetensors"
    assert adapter_file.stat().st_size > 0
    assert out.report_html.stat().st_size > 1000
    assert json.loads(out.metrics.read_text())
    record = json.loads(out.registration.read_text())
    evaluated = json.loads((out.evaluation / "eval.json").read_text())["lineage"]["adapter_sha256"]
    # The registry key starts with the sha256 of the adapter that evaluate scored: the trained one.
    assert record["key"].startswith(evaluated + ":")
    gate = json.loads((out.run_dir / "gate" / "gate_decision" / "gate.json").read_text())
    assert gate["decision"] == decision == out.decision, gate["summary"]
    branch = "promote" if decision == "champion" else "record-candidate"
    assert out.registration.parent.parent.name == branch
    assert record["gate_passed"] is (decision == "champion")
    assert (record["champion"] is not None) is (decision == "champion")
    assert logged_metrics(out.run_dir, "train")["steps"] > 0
    assert "Run succeeded" in (out.run_dir / "finalize-run" / "run_status").read_text()
