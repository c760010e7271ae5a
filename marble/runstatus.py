"""The end of a pipeline run, handled by the pipeline's exit handler.

KFP runs the exit task after every other task, whether they succeeded or not, and hands it the run's
final status (state, failing task, error). `finish_run` deletes a multi-node run's PyTorchJob if it is
still active (nothing may keep GPUs after the run) and records what a user needs to find a failure;
the pipeline writes it to the run's directory on the cache PVC (`runs/<run id>/run_status.json`,
beside the checkpoints) and shows it in the run view.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from marble.io import atomic_write_text

STATUS_FILE = "run_status.json"


def run_status_record(final_status: dict[str, Any]) -> dict[str, Any]:
    """A JSON record of KFP's PipelineTaskFinalStatus (as a dict) with the time it was taken."""
    state = str(final_status.get("state") or "UNKNOWN")
    return {
        "state": state,
        "failed": state not in ("SUCCEEDED", "SKIPPED"),
        "run": final_status.get("pipeline_job_resource_name"),
        "task": final_status.get("pipeline_task_name"),
        "error_code": final_status.get("error_code"),
        "error_message": final_status.get("error_message"),
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def finish_run(
    final_status: dict[str, Any], work_root: str | Path, run_id: str, *, delete_train_jobs: bool = False
) -> dict[str, Any]:
    """Clean up the run's training jobs (when it launched any), then record the run's end.

    A cleanup failure does not stop the record: it is kept in it (`cleanup_error`) for the caller to
    raise after the record is written.
    """
    record = run_status_record(final_status)
    if delete_train_jobs:
        from marble.cluster.train_task import cleanup_run_jobs

        try:
            record["deleted_train_jobs"] = cleanup_run_jobs(run_id)
        except Exception as exc:  # the Kubernetes client raises many types; the message is what matters
            record["cleanup_error"] = f"{type(exc).__name__}: {exc}"
    write_run_status(record, work_root, run_id)
    return record


def write_run_status(record: dict[str, Any], work_root: str | Path, run_id: str) -> Path | None:
    """`<work_root>/runs/<run_id>/run_status.json`; None without a work root (a local run)."""
    if not work_root:
        return None
    path = Path(work_root) / "runs" / run_id / STATUS_FILE
    return atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def run_status_markdown(record: dict[str, Any]) -> str:
    title = "Run failed" if record["failed"] else "Run succeeded"
    keys = ("state", "run", "task", "error_code", "error_message", "deleted_train_jobs", "cleanup_error")
    rows = [(k, record.get(k)) for k in (*keys, "recorded_at") if k in record]
    lines = [f"# {title}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/') if v not in (None, '') else '–'} |" for k, v in rows]
    if record["failed"]:
        lines += ["", "The failing task's own log in the run view says why; its artifacts are kept."]
    if record.get("cleanup_error"):
        lines += [
            "",
            "**The run's PyTorchJob could not be deleted: delete it by hand (`kubectl delete pytorchjob`).**",
        ]
    return "\n".join(lines) + "\n"
