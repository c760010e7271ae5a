"""Shared helpers of the training tests: a TINY training config and file readers."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from marble.config import MarbleConfig
from marble.configio import validate_config

# 3 prompts x 4 images = 12 samples per epoch; micro-batches of 6 -> 2 optimizer steps per epoch.
TRAIN_OVERRIDES = {
    "sampling": {"num_steps": 4, "group_size": 4, "prompts_per_epoch": 3, "batch_size": 12},
    "train": {
        "epochs": 5,
        "micro_batch_size": 6,
        "gradient_accumulation_steps": 1,
        "checkpoint_every": 2,
        "keep_last": 5,
        "diagnostics_every": 2,
        "tensorboard": False,
        "progress_bar": False,
    },
    "balancer": {
        "kind": "marble",
        "gram_source": "params",
        "refresh_every": 3,
        "ema_decay": 0.7,
        "refresh_micro_steps": "first_slot",
        "refresh": "step",  # marble's own settings, whatever balancer the tiny config ships
        "normalize": "batch",
        "gamma_cap": 50.0,
    },
    "data": {"sources": [{"kind": "tiny_world", "num_prompts": 24, "seed": 0}], "test_fraction": 0.25},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def train_config(tiny_config: MarbleConfig, **sections: dict) -> MarbleConfig:
    """The conftest tiny config shrunk for training tests, with section overrides merged in."""
    data = _merge(tiny_config.model_dump(mode="json"), TRAIN_OVERRIDES)
    data = _merge(data, sections)
    return validate_config(data, "test")


def write_config(cfg: MarbleConfig, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(s) for s in (out_dir / "metrics.jsonl").read_text().splitlines()]


def latest_checkpoint(out_dir: Path) -> Path:
    return sorted((out_dir / "checkpoints").glob("step-*"))[-1]


def checkpoint_tensors(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(str(ckpt / f"adapter-{n}.safetensors")) for n in ("trainable", "old", "ema")}


def checkpoint_balancer(ckpt: Path) -> dict:
    return torch.load(ckpt / "objects.pt", weights_only=True)["balancer"]


@contextmanager
def first_epoch(cfg: MarbleConfig, prompts_dir: Path, out_dir: Path, before_rollout=None):
    """`(trainer, rollout buffer, epoch plan)` of epoch 0, as `marble train` starts it: `Trainer.setup()`,
    `before_rollout(trainer)` if given, the epoch's rollouts; the trainer is cleaned up on exit."""
    from marble.train.stepping import EpochPlan
    from marble.train.trainer import Trainer

    tr = Trainer(cfg, prompts_dir, out_dir)
    tr.setup()
    try:
        if before_rollout is not None:
            before_rollout(tr)
        buf = tr.rollout(0)
        yield tr, buf, EpochPlan(cfg, buf, 1, 0, tr.grid)
    finally:
        tr.cleanup()


def capture_step_gradients(tr) -> list[dict[str, torch.Tensor]]:
    """Wraps `tr.optimizer.step`: every call first appends the gradient of each trained parameter (by
    name, in `tr.params` order) that the step is about to apply."""
    grads: list[dict[str, torch.Tensor]] = []
    step = tr.optimizer.step

    def capture(*args, **kwargs):
        named = [(n, p) for n, p in tr.model.named_parameters() if p.requires_grad]
        grads.append({n: p.grad.detach().clone() for n, p in named})
        return step(*args, **kwargs)

    tr.optimizer.step = capture
    return grads


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """`[P]`: one captured step gradient, flattened in `tr.params` order."""
    return torch.cat([g.flatten() for g in grads.values()])


def first_step_gradient(cfg: MarbleConfig, prompts_dir: Path, out_dir: Path):
    """(gradient per trained parameter at the first `optimizer.step`, the epoch's rollout latents, the
    step's metrics), through the trainer's own optimizer step."""
    with first_epoch(cfg, prompts_dir, out_dir) as (tr, buf, plan):
        grads = capture_step_gradients(tr)
        metrics = tr.optimizer_step(plan, range(cfg.train.gradient_accumulation_steps))
    return grads[0], buf.latents, metrics
