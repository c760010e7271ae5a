"""Graceful stop on SIGTERM: the trainer checkpoints at the next optimizer-step boundary and exits.

Kubernetes (and Kubeflow retries) send SIGTERM before killing a pod; the handler only sets a flag,
so no work happens inside the signal handler and the checkpoint is written by the training loop.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)


class StopRequest:
    """Context manager that turns SIGTERM into a `requested` flag (restores the old handler on exit)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            log.warning(
                "received %s: checkpointing at the next step boundary, then stopping",
                signal.Signals(signum).name,
            )
        self.requested = True
        self.signum = signum

    def __enter__(self) -> StopRequest:
        # Signal handlers can only be installed from the main thread (e.g. not inside a worker thread).
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()
