"""The run view's numbers and pages, from the files the stages write; the exit handler's record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from marble.runstatus import run_status_markdown, run_status_record, write_run_status
from marble.runview import (
    gate_markdown,
    gate_metrics,
    registration_markdown,
    registration_metrics,
    tensorboard_ui_metadata,
    train_metrics,
    training_view_html,
)


@pytest.fixture
def train_dir(tmp_path) -> Path:
    """A training directory as the trainer leaves it (train_summary.json, metrics.jsonl)."""
    records = [
        {"step": s, "train/reward/brightness": 0.1 * s, "train/reward/colorfulness": 0.5, "loss/policy": 1.0 / s,
         "balance/alpha/brightness": a, "balance/alpha/colorfulness": 1 - a, "time/train_s": 0.2 * s}
        for s, a in ((1, 0.5), (2, 0.6), (3, 0.7), (4, 0.8))
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "reward_first": {"brightness": 0.1, "colorfulness": 0.5},
        "reward_last": {"brightness": 0.4, "colorfulness": 0.5},
        "alpha": {"brightness": [0.5, 0.6, 0.7, None], "colorfulness": [0.5, 0.4, 0.3, None]},
        "steps": 4,
        "train_seconds": 10.0,
        "skipped_steps": 1,
    }
    (tmp_path / "train_summary.json").write_text(json.dumps(summary))
    return tmp_path


def test_train_metrics_are_the_final_numbers_of_the_run(train_dir):
    m = train_metrics(train_dir)
    assert m == {
        "reward/brightness": 0.4,
        "reward/colorfulness": 0.5,
        "reward_change/brightness": pytest.approx(0.3),
        "reward_change/colorfulness": 0.0,
        # The last finite α (the final step of a run may carry none).
        "alpha/brightness": 0.7,
        "alpha/colorfulness": 0.3,
        "steps": 4.0,
        "skipped_steps": 1.0,
        "seconds_per_step": 2.5,
        "update_seconds_per_step": pytest.approx(0.5),
    }
    assert all(isinstance(v, float) for v in m.values())


def test_the_training_page_embeds_the_curves_and_the_numbers(train_dir):
    page = training_view_html(train_dir, "Training tiny")
    assert page.count('src="data:image/png;base64,') == 1
    assert "<td>reward/brightness</td><td>0.4</td>" in page and "Training tiny" in page


def test_tensorboard_metadata_points_the_viewer_at_the_pvc():
    view = tensorboard_ui_metadata(
        "/mnt/marble-cache/runs/r1/train/tensorboard", pvc="marble-cache", mount="/mnt/marble-cache"
    )
    (entry,) = view["outputs"]
    assert (
        entry["type"] == "tensorboard"
        and entry["source"] == "volume://marble-cache/runs/r1/train/tensorboard"
    )
    spec = entry["pod_template_spec"]["spec"]
    assert spec["containers"][0]["volumeMounts"] == [
        {"name": "marble-cache", "mountPath": "/mnt/marble-cache"}
    ]
    assert spec["volumes"] == [
        {"name": "marble-cache", "persistentVolumeClaim": {"claimName": "marble-cache"}}
    ]
    assert tensorboard_ui_metadata("/tmp/run/train/tensorboard") == {
        "outputs": [{"type": "tensorboard", "source": "/tmp/run/train/tensorboard"}]
    }


def test_gate_and_registration_views():
    decision = {"decision": "candidate", "passed": False, "summary": "failed: held_out/jpeg: drop",
                "checks": [{"rule": "held_out", "subject": "jpeg", "passed": False, "detail": "delta -0.1 | big"}],
                "champion_before": None, "version": None}  # fmt: skip
    md = gate_markdown(decision)
    assert "failed: record as `candidate`" in md and "No champion yet." in md
    assert "| held_out | jpeg | **no** | delta -0.1 \\| big |" in md
    assert gate_metrics(decision) == {"gate/passed": 0.0, "gate/checks": 1.0, "gate/failed_checks": 1.0}
    record = {"version": "2", "model_name": "m", "gate_summary": "passed", "created": False, "champion": "2"}
    md = registration_markdown(record, "models:/m/2", "champion", None)
    assert "# Registered as `champion`" in md and "| registry | models:/m/2 |" in md and "idempotent" in md
    assert registration_metrics(record, "champion") == {"promoted": 1.0, "new_version": 0.0, "version": 2.0}
    assert "version" not in registration_metrics({"version": "v-abc"}, "candidate")


def test_run_status_is_recorded_beside_the_checkpoints(tmp_path):
    failed = run_status_record(
        {
            "state": "FAILED",
            "pipeline_task_name": "marble-run",
            "error_code": 1,
            "error_message": "Task train failed.",
        }
    )
    assert failed["failed"] is True and failed["error_message"] == "Task train failed."
    path = write_run_status(failed, tmp_path, "run-7")
    assert path == tmp_path / "runs" / "run-7" / "run_status.json"
    assert json.loads(path.read_text())["state"] == "FAILED"
    assert write_run_status(failed, "", "run-7") is None
    assert "# Run failed" in run_status_markdown(failed)
    ok = run_status_record({"state": "SUCCEEDED"})
    assert ok["failed"] is False and "# Run succeeded" in run_status_markdown(ok)


def test_no_summary_no_metrics_and_no_tensorboard_without_event_files(tmp_path, train_dir):
    from marble.configio import load_config
    from marble.runview import train_view_files

    assert train_metrics(tmp_path / "empty") == {}
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml", ["train.tensorboard=false"]
    )
    values, page, viewer = train_view_files(cfg, train_dir)
    assert values == train_metrics(train_dir) and "<img" in page and viewer == {"outputs": []}
