"""A full disk while writing a checkpoint: one clear error, no temporary left, resume once space is freed."""

from __future__ import annotations

import builtins
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_helpers import read_metrics, train_config, write_config

from marble.data.prepare import prepare_prompts
from marble.errors import StorageError
from marble.train.checkpoint import Checkpoint, CheckpointManager, list_checkpoints, verify_checkpoint
from marble.train.trainer import run_training

REPO = Path(__file__).resolve().parents[1]


class FullDisk:
    """`open` for the checkpoint module where the disk fills up inside one checkpoint directory: the
    first write there gets half its bytes on disk, then ENOSPC (what the kernel does when it fills)."""

    def __init__(self, directory_name: str):
        self.directory_name = directory_name
        self.failed = 0

    def __call__(self, file, mode="r", *args, **kwargs):
        fh = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 (returned to the caller)
        if "w" not in mode or self.directory_name not in str(file):
            return fh
        real_write, disk = fh.write, self

        def write(data):
            real_write(data[: len(data) // 2])
            disk.failed += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        fh.write = write
        return fh


def _ckpt(step: int) -> Checkpoint:
    w = torch.full((64, 64), float(step))
    return Checkpoint(
        state={"step": step, "epoch": step},
        adapters={"trainable": {"w": w}, "old": {"w": w * 2}, "ema": {"w": w * 3}},
        objects={"optimizer": {"m": torch.ones(8) * step}},
    )


def test_checkpoint_write_on_a_full_disk_leaves_the_previous_one_to_resume_from(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep_last=3, compat={"k": 1})
    mgr.save(_ckpt(2))
    disk = FullDisk(".tmp-step-00000004")
    monkeypatch.setattr("marble.train.checkpoint.open", disk, raising=False)
    with pytest.raises(StorageError) as err:
        mgr.save(_ckpt(4))
    needed = sum(
        p.stat().st_size for p in (tmp_path / "step-00000002").iterdir() if p.name != "manifest.json"
    )
    msg = str(err.value)
    assert str(tmp_path / "step-00000004") in msg and "No space left on device" in msg
    assert f"it needed {needed:,} bytes" in msg  # the serialised size of what the checkpoint writes
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]  # no temporary left
    monkeypatch.undo()  # space freed
    resumed = mgr.load(mgr.resolve("latest"))
    assert resumed.step == 2
    resumed.state["step"] = 4
    verify_checkpoint(mgr.save(resumed))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]


@pytest.mark.slow  # two real training runs (about 1.5 CPU-minutes)
def test_training_on_a_full_disk_then_resume_after_freeing_space(tiny_config, tmp_path, monkeypatch):
    cfg = train_config(tiny_config, train={"epochs": 2, "checkpoint_every": 1})  # checkpoints at steps 2, 4
    prompts, out = tmp_path / "prompts", tmp_path / "train"
    prepare_prompts(cfg, prompts)
    disk = FullDisk(".tmp-step-00000004")
    monkeypatch.setattr("marble.train.checkpoint.open", disk, raising=False)
    with pytest.raises(StorageError) as err:
        run_training(cfg, prompts, out)
    msg = str(err.value)
    assert disk.failed == 1 and "step-00000004" in msg and "No space left on device" in msg
    assert "it needed" in msg and "bytes free" in msg
    ckpts = out / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-00000002"]
    assert not list(ckpts.glob(".tmp-*"))  # the half-written checkpoint is gone
    verify_checkpoint(ckpts / "step-00000002")

    monkeypatch.undo()  # space freed
    run_training(cfg, prompts, out)
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-00000002", "step-00000004"]
    verify_checkpoint(ckpts / "step-00000004")
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]  # steps 3-4 ran once, after the resume
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4


_LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
sys.argv = ["marble", *sys.argv[1:]]
runpy.run_module("marble.cli", run_name="__main__")
"""


def test_cli_reports_a_real_failed_write_and_exits_with_the_io_code(tiny_config, tmp_path):
    """`marble prepare` under a 2 KB file-size limit: the kernel refuses the prompt files for real."""
    cfg_path = write_config(train_config(tiny_config), tmp_path / "cfg.yaml")
    out = tmp_path / "prompts"
    proc = subprocess.run(
        [sys.executable, "-c", _LIMITED, "prepare", "--config", str(cfg_path), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 74, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and str(out) in error[0] and "File too large" in error[0], proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]  # nothing half-written
