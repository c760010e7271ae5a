"""Exit handler of a multi-node run: delete the run's PyTorchJob if it is still active
(`marble.cluster.train_task.cleanup_run_jobs`), so a failed or stopped run leaves no GPUs running."""

from components._factory import make_component


def cleanup_train_job(run_id: str):
    from marble.cluster.train_task import cleanup_run_jobs

    deleted = cleanup_run_jobs(run_id)
    print(f"deleted active PyTorchJobs: {', '.join(deleted)}" if deleted else "no active PyTorchJob left")


def build(containerized: bool = False):
    return make_component(cleanup_train_job, role="cpu", containerized=containerized)


component = build()
