"""Acceptance of the train stage (slow): `marble train --config configs/tiny.yaml` as a user runs it
writes the adapter, checkpoints and metrics, and raises the mean of every general reward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _train_helpers import read_metrics

from marble.configio import load_config

REPO = Path(__file__).resolve().parents[1]
GENERAL_FAMILY_REWARDS = ("brightness", "colorfulness")  # the tiny world's trained general rewards


@pytest.mark.slow
def test_tiny_yaml_trains_and_improves_general_rewards(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    out = tmp_path / "outputs"
    proc = subprocess.run(
        [sys.executable, "-m", "marble.cli", "train", "--config", "configs/tiny.yaml",
         "--set", f"output_dir={out}", "--set", "train.progress_bar=false"],
        cwd=REPO, env={**os.environ}, capture_output=True, text=True, timeout=3600,  # shared CPUs can be slow
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_dir = out / cfg.run_name / "train"
    assert f"adapter: {train_dir / 'adapter'}" in proc.stdout
    assert (train_dir / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert list((train_dir / "checkpoints").glob("step-*"))
    recs = read_metrics(train_dir)
    assert len(recs) == cfg.train.epochs * (
        cfg.sampling.samples_per_epoch // cfg.train.micro_batch_size // cfg.train.gradient_accumulation_steps
    )
    summary = json.loads((train_dir / "train_summary.json").read_text())
    for name in GENERAL_FAMILY_REWARDS:
        assert summary["reward_last"][name] > summary["reward_first"][name], (name, summary)
