"""Training rewards against the base model on the same prompts and noise, step by step.

A run's `train/reward/<name>` at step i is the mean reward of that step's rollouts: 6 of the 96
training prompts, about two per specialist, so its curve mixes what training did with which prompts
the step drew (the base model's colour accuracy ranges from 5% to 100% by colour, bench/README.md).
The reward study (`bench.reward_balance`) therefore also trains, for every core seed, a run whose
adapter does not move (`BASE`: the weighted sum's settings at `train.lr=1e-12`, the config requiring
lr > 0) through the same `marble train` command. Its step i draws the same prompts and initial noise as
every preset's step i on that seed, so `preset - base` at step i is what the adapter changed on those
very rollouts. At step 1 the adapters are still zero, so the two must agree there (to `STEP1_TOLERANCE`),
or the runs are not paired and `paired_curves` refuses them.

Reported per preset and reward (`summarise`): the mean over seeds of `preset - base` in windows of
`WINDOW` steps counted back from the last step (so the last window is full; the first may be short),
and over the last third of the steps the per-seed means with a 95% t-interval across seeds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import t_interval
from marble.eval.report import read_training_metrics
from marble.train.metrics import METRICS_FILE

BASE = "base"  # the reward study's name for the runs whose adapter stays at zero
FROZEN_LR = "train.lr=1e-12"  # an AdamW step of 1e-12 leaves the zero-initialised LoRA B at ~1e-12
STEP1_TOLERANCE = 1e-6  # rewards of the same images; well above float32 noise, far below a reward's step
WINDOW = 6


def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-step rows of a run's `metrics.jsonl`; refuses a run that wrote none."""
    if not (run_dir / METRICS_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / METRICS_FILE}: no metrics (was the run trained?)")
    return read_training_metrics(run_dir)


def paired_curves(
    preset_rows: list[dict[str, Any]], base_rows: list[dict[str, Any]], rewards: list[str], where: str
) -> dict[str, list[float | None]]:
    """Per reward, `preset - base` at every step both ran (None where either had no valid sample)."""
    steps = min(len(preset_rows), len(base_rows))
    if steps == 0:
        raise ValueError(f"{where}: no common steps with the base run")
    out: dict[str, list[float | None]] = {}
    for name in rewards:
        key = f"train/reward/{name}"
        a0, b0 = preset_rows[0].get(key), base_rows[0].get(key)
        if a0 is not None and b0 is not None and abs(a0 - b0) > STEP1_TOLERANCE:
            raise ValueError(
                f"{where}: step 1 {key} = {a0!r}, the base run's = {b0!r}: not the same prompts and "
                "noise, so the runs are not paired"
            )
        diffs: list[float | None] = []
        for i in range(steps):
            a, b = preset_rows[i].get(key), base_rows[i].get(key)
            diffs.append(None if a is None or b is None else a - b)
        out[name] = diffs
    return out


def summarise(
    per_seed: dict[int, dict[str, list[float | None]]],
    rewards: list[str],
    window: int = WINDOW,
) -> dict[str, Any]:
    """Per reward: the mean over seeds and steps in each window of `window` steps (counted back from the
    last step), and over the last third of the steps (at least one) each seed's mean, with a 95% t-interval
    across seeds."""
    out: dict[str, Any] = {}
    for name in rewards:
        table = np.array(
            [[math.nan if d is None else d for d in curves[name]] for curves in per_seed.values()],
            dtype=np.float64,
        )  # [seeds, steps]
        steps = table.shape[1]
        last = max(1, round(steps / 3))
        ends = range(steps, 0, -window)[::-1]
        windows = [
            {"steps": [max(e - window, 0) + 1, e], "mean": _nanmean(table[:, max(e - window, 0) : e])}
            for e in ends
        ]
        per_seed_last = [_nanmean(row[-last:]) for row in table]
        out[name] = {
            "windows": windows,
            "last": {
                "steps": [steps - last + 1, steps],
                "per_seed": per_seed_last,
                **t_interval(per_seed_last),
            },
        }
    return out


def _nanmean(a: np.ndarray) -> float:
    return float(np.nanmean(a)) if np.isfinite(a).any() else math.nan


def study(
    runs_dir: Path,
    presets: list[str],
    seeds: list[int],
    rewards: list[str],
) -> dict[str, Any]:
    """The reward study's runs (`<preset>-seed<s>` under `runs_dir`) against its `BASE` runs: the
    base's own curve and, per preset, `summarise` of the paired differences on the seeds both ran."""
    base = {s: load_metrics(runs_dir / f"{BASE}-seed{s}") for s in seeds}
    base_curves = {
        s: {n: [r.get(f"train/reward/{n}") for r in rows] for n in rewards} for s, rows in base.items()
    }
    out: dict[str, Any] = {
        "base_runs": f"weighted sum at {FROZEN_LR} (the adapter stays zero), seeds {seeds}",
        "window": WINDOW,
        "base": summarise(base_curves, rewards),
        "presets": {},
    }
    for preset in presets:
        per_seed = {
            s: paired_curves(load_metrics(run), base[s], rewards, str(run))
            for s in seeds
            if (run := runs_dir / f"{preset}-seed{s}").joinpath(METRICS_FILE).is_file()
        }
        if per_seed:
            out["presets"][preset] = {
                "seeds": list(per_seed),
                "rewards": summarise(per_seed, rewards),
            }
    return out
