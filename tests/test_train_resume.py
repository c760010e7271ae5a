"""Exact resume: a run killed (SIGKILL, off a checkpoint boundary) or stopped (SIGTERM) and resumed ends
bitwise identical to an uninterrupted run (CPU): trainable adapter, old adapter, EMA, balancer state.

The runs are real `marble train` subprocesses (the kill must hit a real process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _train_helpers import (
    checkpoint_balancer,
    checkpoint_tensors,
    latest_checkpoint,
    read_metrics,
    train_config,
    write_config,
)

from marble.data.prepare import prepare_prompts
from marble.train.trainer import Trainer, TrainingInterrupted, run_training

pytestmark = pytest.mark.tiny_model  # loads the built tiny model (tests/conftest.py)

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4  # 2 optimizer steps per epoch -> 8 steps; checkpoints every 2 epochs (steps 4, 8)


def _cmd(cfg_path: Path, prompts: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "marble.cli", "train", "--config", str(cfg_path),
            "--prompts", str(prompts), "--out", str(out)]  # fmt: skip


def _env() -> dict[str, str]:
    # CPU kernels are bitwise reproducible for a fixed thread count: use this process's count
    n = str(torch.get_num_threads())
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TQDM_DISABLE": "1"}


def _last_logged_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [int(s.split('"step": ', 1)[1].split(",", 1)[0]) for s in lines if s.endswith("}")]
    return max(steps, default=0)


@pytest.fixture(scope="module")
def setup(tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cfg = train_config(tiny_config, train={"epochs": EPOCHS, "keep_last": 10})
    prompts = root / "prompts"
    prepare_prompts(cfg, prompts)
    ref = root / "reference"
    run_training(cfg, prompts, ref)
    return cfg, prompts, ref


def _assert_same_run(ref: Path, other: Path) -> None:
    a, b = latest_checkpoint(ref), latest_checkpoint(other)
    assert a.name == b.name == f"step-{2 * EPOCHS:08d}"
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    for name in ("trainable", "old", "ema"):
        assert ta[name].keys() == tb[name].keys()
        for k in ta[name]:
            assert torch.equal(ta[name][k], tb[name][k]), f"{name} adapter differs at {k}"
    assert checkpoint_balancer(a) == checkpoint_balancer(b)
    ma, mb = read_metrics(ref), read_metrics(other)
    assert [r["step"] for r in mb] == list(range(1, 2 * EPOCHS + 1))
    for ra, rb in zip(ma, mb, strict=True):
        assert ra["loss/policy"] == rb["loss/policy"], ra["step"]


@pytest.mark.slow  # over 10 s on the 2-core machine: `make test-slow`
def test_sigkill_off_boundary_then_resume_is_bitwise_identical(setup, tmp_path):
    cfg, prompts, ref = setup
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(write_config(cfg, tmp_path / "cfg.yaml"), prompts, out), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    # step 5 is the first step of epoch 3, one step past the checkpoint at step 4
    while _last_logged_step(out) < 5:
        if proc.poll() is not None:
            pytest.fail(f"run ended before step 5: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("run too slow")
        time.sleep(0.002)
    proc.kill()  # SIGKILL: no handler runs, nothing is flushed
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert _last_logged_step(out) < 2 * EPOCHS, "the run finished before the kill"
    run_training(cfg, prompts, out)
    _assert_same_run(ref, out)


def test_sigterm_checkpoints_then_resume_is_bitwise_identical(setup, tmp_path, monkeypatch):
    cfg, prompts, ref = setup
    out = tmp_path / "terminated"
    real_log = Trainer._log

    def log_then_sigterm(self, metrics, buf, **kw):
        real_log(self, metrics, buf, **kw)
        if self.step == 5:  # mid-epoch 3: the checkpoint must carry the epoch's rollouts
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Trainer, "_log", log_then_sigterm)
    with pytest.raises(TrainingInterrupted, match="stopped by signal at step 5"):
        run_training(cfg, prompts, out)
    monkeypatch.setattr(Trainer, "_log", real_log)
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step-00000005"
    assert "buffer" in torch.load(ckpt / "objects.pt", weights_only=True)
    run_training(cfg, prompts, out)
    _assert_same_run(ref, out)
