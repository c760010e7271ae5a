"""The pipeline's exit handler: record how the run ended and, for a multi-node run, delete its
PyTorchJob if it is still active (`marble.runstatus.finish_run`), whether the tasks succeeded or not.

KFP runs this task after all others and passes the run's final status (`dsl.PipelineTaskFinalStatus`).
It takes no task outputs (an exit task cannot), only what is fixed at compile time and the run id. A
pipeline has one exit handler (kfp refuses nested ones), so this one task does both jobs.
"""

from kfp import dsl
from kfp.dsl import Markdown, Output

from components._factory import make_component


def finalize_run(
    status: dsl.PipelineTaskFinalStatus,
    work_root: str,
    run_id: str,
    delete_train_jobs: bool,
    run_status: Output[Markdown],
):
    """Writes `run_status` (Markdown) and, on a cluster, `<work_root>/runs/<run_id>/run_status.json`;
    fails when the job cleanup failed (after recording it), so no GPUs are left running unnoticed."""
    import logging
    from pathlib import Path

    from marble.runstatus import finish_run, run_status_markdown

    final = {
        "state": status.state,
        "pipeline_job_resource_name": status.pipeline_job_resource_name,
        "pipeline_task_name": status.pipeline_task_name,
        "error_code": status.error_code,
        "error_message": status.error_message,
    }
    record = finish_run(final, work_root, run_id, delete_train_jobs=delete_train_jobs)
    Path(run_status.path).write_text(run_status_markdown(record), encoding="utf-8")
    if record["failed"]:
        logging.getLogger("marble.run").error(
            "run %s ended %s: %s", run_id, record["state"], record["error_message"]
        )
    if record.get("cleanup_error"):
        raise RuntimeError(f"deleting run {run_id}'s PyTorchJobs failed: {record['cleanup_error']}")


def build(containerized: bool = False):
    return make_component(finalize_run, role="cpu", containerized=containerized)


component = build()
