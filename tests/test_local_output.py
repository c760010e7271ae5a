"""`RunOutput`: what a local pipeline run shows on the terminal; every line kept in the log."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from pipelines.local_output import SHOWN_BARS, RunOutput, quiet_run_output

REPO = Path(__file__).resolve().parents[1]

KFP_LINES = [
    "10:00:00.001 - INFO - Executing task \x1b[96m'train'\x1b[0m",
    "10:00:00.002 - INFO - Streamed logs:",
    '    [KFP Executor 2026-11-30 10:00:00,100 INFO]: Got executor_input: {"inputs": {}}',
    "    train:   0%|          | 0/8 [00:00<?, ?step/s]",
    "    train:  50%|#####     | 4/8 [00:01<00:01, 4.0step/s, step=4, brightness=0.5]",
    "    train: 100%|##########| 8/8 [00:02<00:00, 4.0step/s, step=8, brightness=0.6]"
    "[KFP Executor 2026-11-30 10:00:02,400 INFO]: Wrote executor output file",
    "    UserWarning: something a library says",
    "10:00:02.500 - INFO - Task \x1b[96m'train'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m",
]


class Terminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def feed(tty: bool) -> tuple[str, str]:
    log, terminal = io.StringIO(), Terminal(tty)
    out = RunOutput(log, terminal)
    for line in KFP_LINES:  # in pieces, as a pipe delivers them
        out.write(line[:7])
        out.write(line[7:] + "\n")
    return terminal.getvalue(), log.getvalue()


def test_terminal_shows_task_start_end_and_progress_only():
    shown, log = feed(tty=False)
    lines = shown.splitlines()
    assert lines[0].endswith("start  train")
    assert [line for line in lines if line.startswith("train:")] == [
        line.split("[KFP")[0].strip() for line in KFP_LINES[3:6]
    ]
    assert lines[-1].endswith("end    train: SUCCESS in 0 s")
    assert len(lines) == 5
    assert "executor" not in shown and "UserWarning" not in shown
    assert log.splitlines() == [
        line.replace("\x1b[96m", "").replace("\x1b[92m", "").replace("\x1b[0m", "") for line in KFP_LINES
    ]


def test_a_terminal_redraws_the_bar_in_place():
    shown, _ = feed(tty=True)
    assert shown.count("\rtrain:") == 3 and "\x1b[K" in shown
    # one line for the start, one for the finished bar, one for the end
    assert shown.count("\n") == 3


def test_bar_refreshes_off_a_terminal_are_thinned_to_quarters():
    log, terminal = io.StringIO(), Terminal(False)
    out = RunOutput(log, terminal)
    for i in range(101):
        out.write(f"train: {i:3d}%|{'#' * (i // 10):<10}| {i}/100\n")
    shown = terminal.getvalue().splitlines()
    assert [line.split("%")[0] for line in shown] == [
        "train:   0",
        "train:  25",
        "train:  50",
        "train:  75",
        "train: 100",
    ]
    assert len(log.getvalue().splitlines()) == 101


def test_failure_shows_the_tail_and_restores_the_streams(tmp_path, capsys):
    saved = sys.stdout, sys.stderr
    with pytest.raises(RuntimeError, match="task failed"), quiet_run_output(tmp_path / "logs" / "run.log"):
        print("Traceback (most recent call last):")
        print("ValueError: the reason")
        raise RuntimeError("task failed")
    assert (sys.stdout, sys.stderr) == saved
    shown = capsys.readouterr().out
    assert "ValueError: the reason" in shown
    assert "ValueError: the reason" in (tmp_path / "logs" / "run.log").read_text()


def test_library_bars_stay_in_the_log():
    log, terminal = io.StringIO(), Terminal(False)
    out = RunOutput(log, terminal)
    out.write("    Loading pipeline components...:  33%|###       | 3/9 [00:31<01:01, 10.27s/it]\n")
    out.write("    Loading weights: 100%|##########| 19/19 [00:00<00:00, 105.73it/s]\x1b[A\n")
    assert terminal.getvalue() == ""
    assert "Loading weights: 100%" in log.getvalue() and "\x1b" not in log.getvalue()


def test_the_shown_bars_are_the_ones_marble_draws():
    sources = "\n".join(p.read_text() for p in (REPO / "marble").rglob("*.py"))
    for desc in SHOWN_BARS:
        assert f'desc="{desc}"' in sources, desc
