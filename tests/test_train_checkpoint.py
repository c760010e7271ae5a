"""Checkpoints: atomic, verified, refused when incompatible, pruned; plus the metrics files and signals."""

from __future__ import annotations

import json
import logging
import os
import random
import signal

import numpy as np
import pytest
import torch

from marble.errors import CheckpointError
from marble.train.checkpoint import (
    Checkpoint,
    CheckpointManager,
    capture_rng,
    list_checkpoints,
    restore_rng,
)
from marble.train.ema import EvalEMA
from marble.train.metrics import MetricsLogger
from marble.train.sampler import derive_seed, stratified_prompts
from marble.train.signals import StopRequest

COMPAT = {"lora.rank": 8, "rewards": ["a", "b"], "model.pretrained": "tiny"}


def _ckpt(step: int) -> Checkpoint:
    g = torch.Generator().manual_seed(step)
    sd = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}
    return Checkpoint(
        state={"step": step, "epoch": step // 2},
        adapters={
            "trainable": sd,
            "old": {k: v * 2 for k, v in sd.items()},
            "ema": {k: v * 3 for k, v in sd.items()},
        },
        objects={
            "optimizer": {"lr": 0.1, "m": torch.ones(2) * step},
            "balancer": {"alpha": torch.tensor([0.3, 0.7])},
        },
    )


def test_roundtrip_is_exact(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3, compat=COMPAT)
    ck = _ckpt(4)
    path = mgr.save(ck)
    assert path.name == "step-00000004"
    assert not list(tmp_path.glob(".tmp-*")), "temporary directory left behind"
    back = mgr.load(mgr.resolve("latest"))
    assert back.step == 4
    for name in ("trainable", "old", "ema"):
        for k, v in ck.adapters[name].items():
            assert torch.equal(back.adapters[name][k], v)
    # the three adapters are stored separately (trainable != ema on disk)
    assert not torch.equal(back.adapters["trainable"]["w"], back.adapters["ema"]["w"])
    assert torch.equal(back.objects["optimizer"]["m"], torch.ones(2) * 4)
    assert back.rng is not None


def test_rng_capture_restore():
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_keep_last_prunes_oldest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2, compat=COMPAT)
    for step in (2, 4, 6):
        mgr.save(_ckpt(step))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]


def test_corrupt_latest_falls_back_with_warning(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep_last=3, compat=COMPAT)
    mgr.save(_ckpt(2))
    latest = mgr.save(_ckpt(4))
    f = latest / "adapter-trainable.safetensors"
    f.write_bytes(f.read_bytes()[:-7])  # truncated by a crash or a bad disk
    with caplog.at_level(logging.WARNING):
        chosen = mgr.resolve("latest")
    assert chosen is not None and chosen.name == "step-00000002"
    assert "damaged" in caplog.text and "adapter-trainable.safetensors" in caplog.text
    # an explicit path to the damaged checkpoint is an error, not a silent fallback
    with pytest.raises(CheckpointError, match="sha256"):
        mgr.resolve(str(latest))


def test_unfinished_temp_dir_is_ignored(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3, compat=COMPAT)
    mgr.save(_ckpt(2))
    (tmp_path / ".tmp-step-00000004").mkdir()  # killed while writing
    (tmp_path / "step-00000006").mkdir()  # no manifest: not a complete checkpoint
    assert mgr.resolve("latest").name == "step-00000002"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lora.rank", 16),
        ("rewards", ["a", "c"]),
        ("model.pretrained", "stabilityai/stable-diffusion-3.5-medium"),
    ],
)
def test_incompatible_checkpoint_is_refused_naming_the_field(tmp_path, field, value):
    CheckpointManager(tmp_path, keep_last=3, compat=COMPAT).save(_ckpt(2))
    other = CheckpointManager(tmp_path, keep_last=3, compat={**COMPAT, field: value})
    with pytest.raises(CheckpointError, match=field.replace(".", r"\.")):
        other.load(other.resolve("latest"))


def test_resume_none_and_missing_dir(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3, compat=COMPAT)
    mgr.save(_ckpt(2))
    assert mgr.resolve("none") is None
    with pytest.raises(CheckpointError, match="train.resume"):
        mgr.resolve(str(tmp_path / "nope"))


def test_fresh_start_among_stale_checkpoints_is_refused(tmp_path):
    """A from-scratch run must not write beside another run's checkpoints: a later resume=latest
    would pick the other run's higher step (found in the benchmark's second run)."""
    empty = CheckpointManager(tmp_path / "new", keep_last=3, compat=COMPAT)
    empty.check_fresh_start()  # nothing there: fine
    mgr = CheckpointManager(tmp_path, keep_last=3, compat=COMPAT)
    mgr.save(_ckpt(40))
    with pytest.raises(CheckpointError, match=r"step-0*40.*train\.resume=latest"):
        mgr.check_fresh_start()
    (tmp_path / "step-00000040" / "manifest.json").unlink()  # damaged: 'latest' finds nothing valid
    assert mgr.resolve("latest") is None
    with pytest.raises(CheckpointError, match="earlier run"):
        mgr.check_fresh_start()


def test_metrics_logger_truncates_on_resume(tmp_path):
    keys = ["train/reward/a"]
    m = MetricsLogger(
        tmp_path, enabled=True, tensorboard=False, curve_keys=keys, alpha_keys=["balance/alpha/a"]
    )
    for step in range(1, 6):
        m.log(step, {"train/reward/a": float(step), "balance/alpha/a": 1.0, "x": float("nan")})
    m.close()
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5] and lines[0]["x"] is None
    m2 = MetricsLogger(
        tmp_path, enabled=True, tensorboard=False, curve_keys=keys, alpha_keys=[], resume_step=3
    )
    m2.log(4, {"train/reward/a": 40.0})
    m2.close()
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and lines[-1]["train/reward/a"] == 40.0
    csv_rows = (tmp_path / "curves.csv").read_text().splitlines()
    assert csv_rows[0] == "step,train/reward/a" and csv_rows[-1] == "4,40.0"


def test_sigterm_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_ema_warmup_decay():
    p = {"w": torch.zeros(2)}
    ema = EvalEMA(p, decay=0.9)
    # k = 0: decay min(1/10, 0.9) = 0.1 -> shadow = 0.1*0 + 0.9*1
    ema.update({"w": torch.ones(2)})
    assert torch.allclose(ema.shadow["w"], torch.full((2,), 0.9))
    for _ in range(200):
        ema.update({"w": torch.ones(2)})
    assert ema.current_decay() == 0.9


def test_stratified_prompts_balanced_and_seeded():
    from marble.data.records import PromptRecord

    recs = [PromptRecord.create(f"p{f}{i}", fam) for f, fam in enumerate(["a", "b", "c"]) for i in range(5)]
    chosen = stratified_prompts(recs, 6, seed=0, epoch=3)
    assert sorted(r.family for r in chosen) == ["a", "a", "b", "b", "c", "c"]
    assert len({r.id for r in chosen}) == 6
    assert chosen == stratified_prompts(recs, 6, seed=0, epoch=3)
    assert chosen != stratified_prompts(recs, 6, seed=0, epoch=4)
    assert derive_seed(0, "noise", 1, 2) != derive_seed(0, "noise", 2, 1)
