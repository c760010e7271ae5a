"""What a local pipeline run shows on the terminal, and the log file that keeps everything else.

Kubeflow's SubprocessRunner prints, for every task, its own log lines, the executor input and output
JSON and all that the task's process writes (library logs, warnings, progress bars: one line per bar
refresh, since it reads the pipe line by line). During a run, `sys.stdout` and `sys.stderr` are
replaced by `RunOutput`, which writes every line to the log file and shows only:
- each task's start and end (with its status and duration),
- marble's progress bars (training, the one-time tiny-model build), redrawn in place on a terminal,
  at every quarter elsewhere,
- on failure, the last lines the run printed (the traceback of the failed task).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colours, and the cursor moves of nested tqdm bars
TASK_START = re.compile(r"Executing task '?([\w.-]+)'?")
TASK_END = re.compile(r"Task '?([\w.-]+)'? finished with status (\w+)")
PROGRESS = re.compile(r"^\s*(?P<desc>[^:|]{1,40}):\s+(?P<pct>\d{1,3})%\|")
# marble's own bars (marble/train/metrics.py, marble/models/tiny.py); the libraries' model-loading bars
# go to the log only.
SHOWN_BARS = frozenset({"train", "tiny model"})
TAIL_LINES = 40


class RunOutput(io.TextIOBase):
    """A text stream that logs every line and shows the few that matter (see the module docstring)."""

    def __init__(self, log: TextIO, terminal: TextIO) -> None:
        self.log = log
        self.terminal = terminal
        self.tty = terminal.isatty()
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._partial = ""
        self._started: dict[str, float] = {}
        self._bar_open = False
        self._bar_quarter: dict[str, int] = {}
        self.failed_tail: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()
        self.terminal.flush()

    def _line(self, line: str) -> None:
        self.log.write(line + "\n")
        self.log.flush()  # the log is there to be followed (`tail -f`) while the run goes on
        if line.strip():
            self.tail.append(line)
        bar = PROGRESS.match(line)
        if bar and bar["desc"].strip() in SHOWN_BARS:
            # A bar refresh ends in "\r", not "\n": the executor's next log line can follow on the same line.
            shown = line.split("[KFP Executor", 1)[0].strip()
            self._progress(shown, bar["desc"].strip(), int(bar["pct"]))
        elif start := TASK_START.search(line):
            self._started[start[1]] = time.perf_counter()
            self._show(f"{time.strftime('%H:%M:%S')} start  {start[1]}")
        elif end := TASK_END.search(line):
            if end[2] == "FAILURE" and not self.failed_tail:
                # The exit handler's task runs after a failure: keep the failed task's own last lines.
                self.failed_tail = list(self.tail)
            seconds = time.perf_counter() - self._started.get(end[1], time.perf_counter())
            self._show(f"{time.strftime('%H:%M:%S')} end    {end[1]}: {end[2]} in {seconds:.0f} s")

    def _progress(self, line: str, desc: str, pct: int) -> None:
        if self.tty:
            self.terminal.write("\r" + line + "\x1b[K")
            self._bar_open = pct < 100
            if not self._bar_open:
                self.terminal.write("\n")
        elif pct // 25 > self._bar_quarter.get(desc, -1):
            self._bar_quarter[desc] = pct // 25
            self.terminal.write(line + "\n")
        self.terminal.flush()

    def _show(self, message: str) -> None:
        if self._bar_open:
            self.terminal.write("\n")
            self._bar_open = False
        self.terminal.write(message + "\n")
        self.terminal.flush()

    def show_tail(self) -> None:
        """Print the last lines the first failed task wrote, else the run's last lines (on failure)."""
        lines = self.failed_tail or list(self.tail)
        self._show(f"--- last {len(lines)} lines of the run's output ---")
        for line in lines:
            self._show(line)


@contextlib.contextmanager
def quiet_run_output(log_path: Path) -> Iterator[RunOutput]:
    """Send the run's stdout and stderr through a `RunOutput` that logs to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    terminal = sys.stdout
    with open(log_path, "w", encoding="utf-8") as log:
        out = RunOutput(log, terminal)
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = out
        try:
            yield out
        except BaseException:
            out.show_tail()
            raise
        finally:
            out.flush()
            sys.stdout, sys.stderr = saved
