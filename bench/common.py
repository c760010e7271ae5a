"""Shared pieces of the tiny-world benchmarks: the environment record, the config, the
trainer world the studies measure, interleaved timing, and JSON output.

Every study builds the SAME objects the product runs: `configs/tiny.yaml` validated by
`marble.configio`, the training recipe `marble.train.trainer.Trainer` (`setup()` loads the tiny SD3
pipeline, adds the LoRA adapters, builds the rewards and the balancer) and its own rollouts. The
studies only swap the balancer (`Trainer.set_balancer`) and observe through the trainer's public
steps (`rollout`, `train_epoch`, `optimizer_step`, `blend_old_policy`); they never re-implement the update.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marble.config import MarbleConfig
from marble.configio import load_config
from marble.io import atomic_write_text

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
WORK_DIR = REPO / "outputs" / "bench"  # git-ignored scratch (prepared prompts, training runs)

PRESETS = (
    "weighted_sum",
    "equal",
    "gdpo",
    "marble",
    "marble_paper",
    "marble_full",
    "marble_step",
    "marble_ub",
    "pcgrad",
    "cagrad",
)

# Settings every study applies on top of configs/tiny.yaml: no TensorBoard, no progress bar, no
# resume from an earlier bench run, no mid-run checkpoints.
QUIET = [
    "train.tensorboard=false",
    "train.progress_bar=false",
    "train.resume=none",
    "train.checkpoint_every=1000",
    "train.diagnostics_every=0",
]


# ---------------------------------------------------------------------------------------- config
def preset_overrides(preset: str, num_trained: int) -> list[str]:
    """`--set` overrides selecting a balancer preset with the defaults of its config class."""
    out = [f"balancer={json.dumps({'kind': preset})}"]
    if preset == "weighted_sum":  # equal weights: the plain weighted-sum baseline
        out = [f"balancer={json.dumps({'kind': preset, 'weights': [1.0] * num_trained})}"]
    return out


def bench_config(preset: str = "marble", overrides: list[str] | None = None) -> MarbleConfig:
    """configs/tiny.yaml + QUIET + the preset + extra overrides (later ones win)."""
    base = load_config(TINY_CONFIG, [])
    k = len(base.trained_reward_names)
    return load_config(TINY_CONFIG, [*QUIET, *preset_overrides(preset, k), *(overrides or [])])


def shipped_balancer() -> str:
    """The balancer kind configs/tiny.yaml ships (the default the benchmarks compare against)."""
    return load_config(TINY_CONFIG, []).balancer.kind


def balancer_config(cfg: MarbleConfig, preset: str) -> Any:
    """The validated balancer node of `preset` (same defaults as `--set balancer.kind=<preset>`)."""
    return load_config(TINY_CONFIG, preset_overrides(preset, len(cfg.trained_reward_names))).balancer


# ---------------------------------------------------------------------------------------- environment
# pathspecs of what `make bench` writes, excluded from the dirty-tree check
BENCH_OUTPUTS = (":(exclude)bench/results", ":(exclude)README.md", ":(exclude)bench/README.md")


def git_commit() -> dict[str, Any]:
    """HEAD of the repo and whether tracked files differ from it (results of a dirty tree say so).

    The files a benchmark run itself rewrites (bench/results, the generated README tables) do not
    count: otherwise every study after the first of a `make bench` run would report a dirty tree."""

    def run(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": run("rev-parse", "HEAD") or None,
        "dirty": bool(run("status", "--porcelain", "-uno", "--", ".", *BENCH_OUTPUTS)),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (runnable processes; 2.0 saturates this 2-core machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def environment() -> dict[str, Any]:
    """Date, machine, versions and git commit recorded in every results JSON."""
    import diffusers
    import numpy as np
    import osqp
    import peft

    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu_model": cpu_model(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "peft": peft.__version__,
            "osqp": osqp.__version__,
            "numpy": np.__version__,
        },
        "marble": git_commit(),
    }


def write_json(path: Path, result: dict[str, Any]) -> Path:
    """Strict JSON (NaN/inf -> null), written atomically."""
    atomic_write_text(path, json.dumps(_clean(result), indent=2, allow_nan=False) + "\n")
    return path


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, torch.Tensor):
        return _clean(x.tolist())
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        return _clean(x.item())
    return x


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def t_interval(xs: list[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean and Student-t interval across seeds (NaN width with one seed)."""
    from scipy import stats

    v = np.asarray([x for x in xs if x is not None and math.isfinite(x)], dtype=np.float64)
    n = v.size
    if n == 0:
        return {"mean": float("nan"), "ci_lo": float("nan"), "ci_hi": float("nan"), "n": 0}
    m = float(v.mean())
    if n == 1:
        return {"mean": m, "ci_lo": float("nan"), "ci_hi": float("nan"), "n": 1}
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * v.std(ddof=1) / math.sqrt(n))
    return {"mean": m, "ci_lo": m - half, "ci_hi": m + half, "n": int(n)}


# ---------------------------------------------------------------------------------------- world
def prepare_prompts(cfg: MarbleConfig, work: Path) -> Path:
    """`marble prepare` into `work/prompts`, on every call: it takes a second, and prompts prepared by
    an earlier checkout (another prompt grammar or split) must never be reused. The output is
    deterministic and replaced atomically."""
    from marble.stages import prepare_prompts as prepare

    out = work / "prompts"
    prepare(cfg, out)
    return out


@dataclasses.dataclass
class World:
    """One trainer (model, adapters, rewards, optimizer) plus its epoch-0 rollouts."""

    trainer: Any  # marble.train.trainer.Trainer after setup()
    buffer: Any  # EpochBuffer of epoch 0 (rewards scored once, shared by every preset)
    cfg: MarbleConfig


def build_world(cfg: MarbleConfig, work: Path, name: str = "world") -> World:
    """`Trainer.setup()` and one epoch of rollouts, exactly as `marble train` starts."""
    from marble.train.trainer import Trainer

    prompts = prepare_prompts(cfg, work)
    trainer = Trainer(cfg, prompts, work / name)
    trainer.setup()
    buf = trainer.rollout(0)
    return World(trainer, buf, cfg)


def buffer_for(world: World, balancer: Any, buf: Any | None = None) -> Any:
    """The epoch buffer with the (r, mask) of `balancer`'s objectives, from the SAME raw rewards.

    `advantage_targets` is the trainer's own function; `weighted_sum` gets one objective (K' = 1)."""
    from marble.train.rollout import advantage_targets

    buf = buf if buf is not None else world.buffer
    n = world.cfg.nft
    r, mask, r_raw, mask_raw, _ = advantage_targets(
        buf.rewards, buf.group_size, balancer.objective_advantages, n.std_mode, n.adv_clip_max
    )
    return dataclasses.replace(buf, r=r, mask=mask, r_raw=r_raw, mask_raw=mask_raw)


def install_balancer(world: World, balancer: Any) -> None:
    """Swap the balancer the trainer uses (the recipe never branches on its kind)."""
    world.trainer.set_balancer(balancer)


def make_balancer(world: World, preset: str) -> Any:
    from marble.rl.balancers import build_balancer

    cfg = world.cfg
    return build_balancer(balancer_config(cfg, preset), world.trainer.reward_names, cfg.num_train_timesteps)


class TrainState:
    """Snapshot/restore of the trainable adapter and the optimizer, so that every timed step of every
    preset starts from the same weights (timing must not depend on where another preset moved them)."""

    def __init__(self, trainer: Any):
        from marble.models import lora

        self.trainer = trainer
        self.adapter = {k: v.clone() for k, v in lora.adapter_state_dict(trainer.model, "default").items()}
        self.optim = copy.deepcopy(trainer.optimizer.state_dict())

    def restore(self) -> None:
        from marble.models import lora

        t = self.trainer
        lora.load_adapter_state_dict(t.model, "default", self.adapter)
        t.optimizer.load_state_dict(copy.deepcopy(self.optim))
        t.optimizer.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------- timing
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(milliseconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def rotated(names: list[str], round_index: int) -> list[str]:
    """A B C, B C A, C A B, ...: interleaved order whose start rotates, so no preset always runs
    right after the same neighbour (cache and allocator state) or first in a round."""
    k = round_index % len(names)
    return names[k:] + names[:k]
