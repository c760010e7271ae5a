"""Run a PyTorchJob to completion: create (or adopt the same run's job), watch, stream the master's
log, and fail, time out or cancel with the job deleted so no GPU is left running."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from marble.cluster.launch import LaunchError

log = logging.getLogger(__name__)

FINISHED = ("Succeeded", "Failed")
EPOCH = datetime.min.replace(tzinfo=timezone.utc)


class JobFailed(LaunchError):
    """The PyTorchJob reported Failed."""


class JobTimedOut(LaunchError):
    """The PyTorchJob did not finish within the train task's deadline; it was deleted."""


class RunCancelled(LaunchError):
    """The pipeline run was stopped (SIGTERM to the task); the PyTorchJob was deleted."""


def job_state(job: dict[str, Any] | None) -> tuple[str, str]:
    """(state, message) from `status.conditions`: Failed / Succeeded win; else the newest true one."""
    conditions = [
        c for c in ((job or {}).get("status") or {}).get("conditions") or [] if c.get("status") == "True"
    ]
    for final in ("Failed", "Succeeded"):
        for c in conditions:
            if c.get("type") == final:
                return final, f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")
    if conditions:
        return conditions[-1].get("type", "Unknown"), conditions[-1].get("message", "")
    return "Pending", ""


class JobRunner:
    """Drives one PyTorchJob through `api` (a `marble.cluster.kubeapi.JobApi` or a fake of it)."""

    def __init__(
        self,
        api: Any,
        *,
        poll_s: float,
        cancel: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        """`cancel` is set (by the SIGTERM handler of the task) when the pipeline run is stopped; the
        runner notices it between two API calls, so no request is cut in half."""
        self.api, self.poll_s, self.clock, self.echo = api, poll_s, clock, echo
        self.cancel = cancel or threading.Event()
        self.sleep = sleep or self.cancel.wait
        self._last_line = EPOCH

    def run(self, job: dict[str, Any], timeout_s: float) -> str:
        """Returns the final message of a Succeeded job; raises JobFailed / JobTimedOut / RunCancelled."""
        name = job["metadata"]["name"]
        self._start(job)
        self.echo(
            f"PyTorchJob {name} in namespace {self.api.namespace}: follow with\n"
            f"  kubectl -n {self.api.namespace} get pytorchjob {name}\n"
            f"  kubectl -n {self.api.namespace} logs -f -l training.kubeflow.org/job-name={name} -c pytorch"
        )
        start = self.clock()
        try:
            return self._watch(name, start, timeout_s)
        except (JobFailed, JobTimedOut):
            raise
        except BaseException as exc:  # SIGTERM (run cancelled), Ctrl-C, a lost API: never leave GPUs running
            self._delete(name, f"{type(exc).__name__}: {exc}")
            if isinstance(exc, RunCancelled | KeyboardInterrupt | SystemExit):
                raise RunCancelled(f"pipeline run cancelled; PyTorchJob {name} deleted") from None
            raise

    def _start(self, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        existing = self.api.get(name)
        state, _ = job_state(existing)
        if existing is None:
            self.api.create(job)
            log.info("created PyTorchJob %s", name)
        elif state == "Failed":  # the same run's earlier attempt: start again, resuming from its checkpoints
            self.echo(f"PyTorchJob {name} of an earlier attempt failed; replacing it (training resumes)")
            self.api.delete(name)
            self._wait_gone(name)
            self.api.create(job)
        else:
            self.echo(f"PyTorchJob {name} already exists ({state}): adopting it")

    def _wait_gone(self, name: str) -> None:
        deadline = self.clock() + 300
        while self.api.get(name) is not None:
            if self.clock() > deadline:
                raise LaunchError(f"PyTorchJob {name} was deleted but is still there after 300 s")
            self.sleep(min(self.poll_s, 5))

    def _watch(self, name: str, start: float, timeout_s: float) -> str:
        while True:
            state, message = job_state(self.api.get(name))
            self._stream_log(name)
            if state == "Succeeded":
                self.echo(f"PyTorchJob {name} succeeded")
                return message
            if state == "Failed":
                raise JobFailed(f"PyTorchJob {name} failed: {message or 'no message'}{self._tail(name)}")
            if self.clock() - start > timeout_s:
                self._delete(name, "deadline")
                raise JobTimedOut(
                    f"PyTorchJob {name} did not finish within {timeout_s:.0f} s "
                    "(pipeline.resources.train.timeout_s); it was deleted"
                )
            self.sleep(self.poll_s)
            if self.cancel.is_set():
                raise RunCancelled("SIGTERM")

    def _stream_log(self, name: str) -> None:
        try:
            lines = self.api.master_log(name, since_s=int(self.poll_s) + 60)
        except Exception as exc:  # logs are a convenience; the job's state decides
            log.debug("log of %s unavailable: %s", name, exc)
            return
        for stamp, text in lines:
            if stamp > self._last_line:
                self.echo(f"[{name}] {text}")
                self._last_line = stamp

    def _tail(self, name: str) -> str:
        try:
            lines = self.api.master_log(name, since_s=3600)[-20:]
        except Exception:
            return ""
        return ("\nlast master log lines:\n" + "\n".join(t for _, t in lines)) if lines else ""

    def _delete(self, name: str, why: str) -> None:
        try:
            self.api.delete(name)
            self.echo(f"deleted PyTorchJob {name} ({why})")
        except Exception as exc:
            self.echo(f"could not delete PyTorchJob {name} ({why}): {exc}; delete it by hand")
