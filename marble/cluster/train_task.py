"""The pipeline's train task: start training as the launch plan says and return its directory.

All three launches train into `<run dir>/train` (on the cache PVC on a cluster), keyed by the pipeline
run id: a retried task of the same run resumes from its checkpoints (`train.resume: latest`), a new run
starts in a new directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from marble.cluster.launch import LaunchError, LaunchPlan, check_world_size
from marble.configio import config_to_yaml
from marble.io import atomic_write_text


def run_train_task(
    cfg: Any,
    plan: LaunchPlan,
    prompts_dir: Path,
    reward_cache: str | None,
    run_dir: Path,
    run_id: str,
    job_api: Callable[[], Any] | None = None,
    *,
    lock: Any = None,
    reward_cache_sha256: str | None = None,
) -> Path:
    """Train per `plan`; returns `<run_dir>/train` (its `adapter/` holds the exported adapter). `lock`
    (the model lock) and `reward_cache_sha256` (the cache manifest's recorded hash) reach every launch:
    the launched `marble train` finds the lock beside the config it is given."""
    check_world_size(cfg, plan.nodes, plan.procs_per_node)  # before any process or pod starts
    train_dir = run_dir / "train"
    if plan.kind == "process":
        from marble import stages

        stages.train(
            cfg,
            prompts_dir,
            train_dir,
            reward_cache=reward_cache,
            lock=lock,
            reward_cache_sha256=reward_cache_sha256,
        )
    else:
        if plan.kind == "pytorchjob":  # the replicas read their inputs from the PVC
            prompts_dir = _share_prompts(prompts_dir, run_dir)
        config = _write_config(cfg, run_dir, lock)
        argv = plan.train_argv(
            str(config), str(prompts_dir), reward_cache, str(train_dir), reward_cache_sha256
        )
        if plan.kind == "accelerate":
            _run_launcher(argv)
        else:
            _run_pytorchjob(cfg, plan, argv, run_id, job_api)
    if not (train_dir / "adapter").is_dir():
        raise LaunchError(f"training finished but wrote no adapter under {train_dir}")
    return train_dir


def _write_config(cfg: Any, run_dir: Path, lock: Any = None) -> Path:
    """The run's config for the launched processes, with its model lock beside it (`config.lock.yaml`)."""
    from marble.hub.lock import lock_path_for, write_lock

    path = run_dir / "config.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, config_to_yaml(cfg))
    if lock is not None:
        write_lock(lock_path_for(path), lock)
    else:
        lock_path_for(path).unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def _sigterm_sets(event: threading.Event) -> Iterator[threading.Event]:
    """SIGTERM (how Kubernetes stops the pod of a cancelled run) sets `event`; the waiting loops check
    it between API calls and process polls, so cleanup never starts inside a half-done request."""

    def handler(signum: int, frame: Any) -> None:
        event.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_launcher(argv: list[str]) -> None:
    """Run `accelerate launch ...` in its own process group; a cancelled run stops every rank."""
    print("launching: " + " ".join(argv), flush=True)
    proc = subprocess.Popen(argv, start_new_session=True)
    with _sigterm_sets(threading.Event()) as cancelled:
        while proc.poll() is None and not cancelled.wait(1.0):
            pass
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
        raise LaunchError("pipeline run cancelled; the training processes were stopped")
    if proc.returncode != 0:
        raise LaunchError(
            f"`{' '.join(argv[:6])} ...` exited with code {proc.returncode}; its output is above"
        )


def _share_prompts(prompts_dir: Path, run_dir: Path) -> Path:
    """The prompts artifact copied next to the run's config on the PVC (what every replica mounts)."""
    shared = run_dir / "prompts"
    if shared.resolve() != Path(prompts_dir).resolve():
        shutil.rmtree(shared, ignore_errors=True)
        shutil.copytree(prompts_dir, shared)
    return shared


def _run_pytorchjob(
    cfg: Any, plan: LaunchPlan, command: list[str], run_id: str, job_api: Callable[[], Any] | None
) -> None:
    from marble.cluster.jobrun import JobRunner
    from marble.cluster.kubeapi import JobApi, current_namespace
    from marble.cluster.pytorchjob import build_job, job_name

    api = job_api() if job_api else JobApi(current_namespace())
    job = build_job(cfg, plan, name=job_name(run_id), namespace=api.namespace, run_id=run_id, command=command)
    with _sigterm_sets(threading.Event()) as cancelled:
        runner = JobRunner(api, poll_s=cfg.pipeline.job_poll_s, cancel=cancelled)
        runner.run(job, timeout_s=cfg.pipeline.resources.train.timeout_s)


def cleanup_run_jobs(run_id: str, job_api: Callable[[], Any] | None = None) -> list[str]:
    """Delete the run's PyTorchJobs that are still active (the pipeline's exit handler); returns names."""
    from marble.cluster.jobrun import FINISHED, job_state
    from marble.cluster.kubeapi import JobApi, current_namespace
    from marble.cluster.pytorchjob import RUN_ID_LABEL, label_value

    api = job_api() if job_api else JobApi(current_namespace())
    deleted = []
    for job in api.list_by_label(f"{RUN_ID_LABEL}={label_value(run_id)}"):
        if job_state(job)[0] not in FINISHED:
            api.delete(job["metadata"]["name"])
            deleted.append(job["metadata"]["name"])
    return deleted
