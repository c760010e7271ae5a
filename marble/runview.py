"""What a run shows in the Kubeflow run view, computed from the files the stages write.

- `train_metrics`: the train task's scalar metrics (final per-reward training means and their change,
  the balancer's final α, skipped steps, time per step) from `train_summary.json` and `metrics.jsonl`;
- `training_view_html`: the training curves (the report's `training.png`, embedded) with those numbers;
- `tensorboard_ui_metadata`: the KFP output-viewer entry that starts TensorBoard on the run's event
  files (KFP's v2 UI renders an artifact named `mlpipeline_ui_metadata` with the v1 viewers).

Pure readers: nothing here changes a stage's outputs.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAIN_SUMMARY = "train_summary.json"
TENSORBOARD_DIR = "tensorboard"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _last_finite(values: list[Any]) -> float | None:
    return next((float(v) for v in reversed(values) if _finite(v)), None)


def train_metrics(train_dir: str | Path) -> dict[str, float]:
    """The train task's Metrics artifact: `reward/<k>` (mean of the last steps' batch means),
    `reward_change/<k>` (last minus first window), `alpha/<k>` (final balancer weight), `skipped_steps`,
    `steps`, `seconds_per_step` (wall time incl. rollouts) and `update_seconds_per_step`."""
    from marble.eval.report import read_training_metrics

    train_dir = Path(train_dir)
    if not (train_dir / TRAIN_SUMMARY).is_file():  # the trainer writes it last; nothing to show without
        log.warning("%s: no %s; the run view shows no training metrics", train_dir, TRAIN_SUMMARY)
        return {}
    summary = json.loads((train_dir / TRAIN_SUMMARY).read_text(encoding="utf-8"))
    out: dict[str, float] = {}
    first, last = summary.get("reward_first", {}), summary.get("reward_last", {})
    for name, value in last.items():
        out[f"reward/{name}"] = value
        if name in first:
            out[f"reward_change/{name}"] = value - first[name]
    for name, trajectory in summary.get("alpha", {}).items():
        alpha = _last_finite(trajectory)
        if alpha is not None:
            out[f"alpha/{name}"] = alpha
    steps = summary.get("steps", 0)
    out["steps"] = steps
    out["skipped_steps"] = summary.get("skipped_steps", 0)
    if steps and _finite(summary.get("train_seconds")):
        out["seconds_per_step"] = summary["train_seconds"] / steps
    updates = [r["time/train_s"] for r in read_training_metrics(train_dir) if _finite(r.get("time/train_s"))]
    if updates:
        out["update_seconds_per_step"] = sum(updates) / len(updates)
    return {k: float(v) for k, v in out.items() if _finite(v)}


def training_view_html(train_dir: str | Path, title: str = "Training") -> str:
    """A self-contained HTML page: the training curves (PNG embedded) and the train task's metrics."""
    from marble.eval.report import plot_training, read_training_metrics

    metrics = train_metrics(train_dir)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>" for k, v in sorted(metrics.items()))
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_training(read_training_metrics(Path(train_dir)), Path(tmp) / "training.png")
        image = (
            f'<img alt="training curves" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">'
            if png is not None
            else "<p>No training records.</p>"
        )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}"
        "td{border:1px solid #ccc;padding:2px 8px}img{max-width:100%}</style></head><body>"
        f"<h2>{html.escape(title)}</h2>{image}<h3>Final values</h3><table>{rows}</table></body></html>\n"
    )


def tensorboard_ui_metadata(log_dir: str | Path, *, pvc: str = "", mount: str = "") -> dict[str, Any]:
    """The KFP output-viewer metadata that offers "Start TensorBoard" for `log_dir`.

    With `pvc`/`mount` (the cache PVC and where the task mounted it) the source is `volume://<pvc>/<path
    in the volume>` and the viewer pod mounts the same claim; otherwise `log_dir` is used as it is
    (an object-store URI the viewer can read, or a local path for `tensorboard --logdir`).
    """
    log_dir = str(log_dir)
    entry: dict[str, Any] = {"type": "tensorboard", "source": log_dir}
    if pvc and mount:
        inside = Path(log_dir).relative_to(mount).as_posix()
        entry["source"] = f"volume://{pvc}/{inside}"
        entry["pod_template_spec"] = {
            "spec": {
                "containers": [{"volumeMounts": [{"name": pvc, "mountPath": mount}]}],
                "volumes": [{"name": pvc, "persistentVolumeClaim": {"claimName": pvc}}],
            }
        }
    return {"outputs": [entry]}


# --------------------------------------------------------------------------------- gate and registry
def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def gate_markdown(decision: dict[str, Any]) -> str:
    """The gate task's view: the decision and every check, passed or not."""
    verdict = "passed: promote to `champion`" if decision["passed"] else "failed: record as `candidate`"
    lines = [f"# Promotion gate {verdict}", ""]
    if decision.get("champion_before"):
        lines.append(f"Compared with champion version {decision['champion_before']}.")
    elif decision.get("version"):
        lines.append(f"Already registered as version {decision['version']}: the decision it got stands.")
    else:
        lines.append("No champion yet.")
    lines += ["", "| rule | subject | passed | detail |", "|---|---|---|---|"]
    for c in decision.get("checks", []):
        mark = "yes" if c["passed"] else "**no**"
        lines.append(f"| {c['rule']} | {_md_cell(c['subject'])} | {mark} | {_md_cell(c['detail'])} |")
    if not decision.get("checks"):
        lines.append(
            f"| – | – | {'yes' if decision['passed'] else '**no**'} | {_md_cell(decision['summary'])} |"
        )
    return "\n".join(lines) + "\n"


def gate_metrics(decision: dict[str, Any]) -> dict[str, float]:
    checks = decision.get("checks", [])
    return {
        "gate/passed": float(decision["passed"]),
        "gate/checks": float(len(checks)),
        "gate/failed_checks": float(sum(not c["passed"] for c in checks)),
    }


def registration_markdown(record: dict[str, Any], link: str, alias: str, note: str | None) -> str:
    """The registering task's view: decision, version, aliases and where to find it."""
    rows = [
        ("decision", f"`{alias}`"),
        ("gate", _md_cell(record.get("gate_summary"))),
        ("model", f"`{record.get('model_name')}` version {record.get('version')}"),
        ("registry", _md_cell(link)),
        ("champion now", record.get("champion")),
        ("candidate now", record.get("candidate")),
        ("champion before", record.get("champion_before")),
        ("new version", "yes" if record.get("created") else "no (already registered: idempotent re-run)"),
        ("adapter source", _md_cell(record.get("source"))),
    ]
    lines = [f"# Registered as `{alias}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v if v is not None else '–'} |" for k, v in rows]
    if note:
        lines += ["", f"**Note:** {note}"]
    return "\n".join(lines) + "\n"


def registration_metrics(record: dict[str, Any], alias: str) -> dict[str, float]:
    out = {"promoted": float(alias == "champion"), "new_version": float(bool(record.get("created")))}
    with contextlib.suppress(KeyError, TypeError, ValueError):  # Kubeflow Model Registry: version names
        out["version"] = float(record["version"])
    return out


def train_view_files(
    cfg: Any, train_dir: str | Path, *, tensorboard_pvc: str = "", mount: str = ""
) -> tuple[dict[str, float], str, dict[str, Any]]:
    """What the train task publishes: (its metrics, its curves page, its TensorBoard viewer entry; no
    viewer when the config writes no event files)."""
    train_dir = Path(train_dir)
    viewer: dict[str, Any] = {"outputs": []}
    if cfg.train.tensorboard:
        viewer = tensorboard_ui_metadata(
            train_dir / TENSORBOARD_DIR, pvc=tensorboard_pvc, mount=mount if tensorboard_pvc else ""
        )
    return train_metrics(train_dir), training_view_html(train_dir, f"Training {cfg.run_name}"), viewer
