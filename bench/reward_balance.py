"""Does every reward improve? Each balancer preset trained on the tiny world, over several seeds.

Training is the real `marble train` command (`python -m marble.cli train --config configs/tiny.yaml
--set ...`), one subprocess per (preset, seed), `--workers` at a time with one torch thread each
(the machine has few cores; runs are independent). Every preset trains the SAME number of optimizer
steps (`--epochs`; configs/tiny.yaml has one step per epoch) from the same prepared prompts; only
`balancer` (the preset's defaults) and `train.seed` change.

Seeds: `--seeds` for the `--core` presets (marble, marble_step, weighted_sum, gdpo), `--other-seeds` (default the
same) for the rest, so that a budget too small for every preset at many seeds still separates the
default from the baselines; every run's seeds are in the JSON.

Evaluation uses the evaluate stage's own pieces (`marble.eval.evaluate`): the held-out split
(`test.jsonl`), fixed per-image seeds and initial noise shared by base and adapter, the stock SD3
pipeline with the pinned Euler solver, `pipe.load_lora_weights` of the exported adapter (EMA weights,
as `marble evaluate`), and every reward (trained and held out). The base images are sampled and scored
once and compared with every adapter (same seeds), so a delta is a paired per-image difference.

Reported per run and reward: base and adapter means, the paired delta with its 95% bootstrap CI
(`marble.eval.stats.paired_delta_ci`) and the delta in base-std units. Per preset and reward over the
seeds: the mean delta and a 95% t-interval across seeds (seed-to-seed variation is the honest error
bar: with 3 seeds t(0.975, 2) = 4.30, so the interval is wide). A preset "improves all trained
rewards" when the seed-mean delta is > 0 for every trained reward (`improves_all_mean`), and
significantly so when every lower bound of the across-seed interval is > 0 (`improves_all_ci`).
Paired comparisons (`PAIRS`, e.g. marble vs weighted_sum): on the seeds both presets ran, the per-seed
difference of their deltas (same seed, same evaluation images), its mean and 95% t-interval.
The world itself: the base model's colour and position accuracy on held-out colour x shape prompts
(`marble.eval.conditioning`), measured here so the README can state it.

Run: `python -m bench.reward_balance [--epochs E --seeds 0 1 2]` -> bench/results/reward_balance.json/.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common, eval_scores, rollouts_vs_base
from bench.common import t_interval
from bench.rollouts_vs_base import BASE, FROZEN_LR
from marble.threads import pinned_threads

log = logging.getLogger(__name__)

OUT_JSON = common.RESULTS / "reward_balance.json"


# ---------------------------------------------------------------------------------------- training
def train_command(
    preset: str, seed: int, epochs: int, prompts: Path, out: Path, extra: list[str], resume: bool = False
) -> list[str]:
    """The `marble train` command line of one run (`resume`: continue from its last checkpoint).
    `rollouts_vs_base.BASE`: the weighted sum's settings with an adapter that does not move (its lr
    last, so that an lr among `extra` cannot move it)."""
    k = len(common.bench_config().trained_reward_names)
    sets = [
        *common.QUIET,
        *common.preset_overrides("weighted_sum" if preset == BASE else preset, k),
        f"train.seed={seed}",
        f"train.epochs={epochs}",
        *(["train.resume=latest"] if resume else []),
        *extra,
        *([FROZEN_LR] if preset == BASE else []),
    ]
    cmd = [sys.executable, "-m", "marble.cli", "train", "--config", str(common.TINY_CONFIG)]
    for s in sets:
        cmd += ["--set", s]
    return [*cmd, "--prompts", str(prompts), "--out", str(out)]


def train_one(
    preset: str, seed: int, epochs: int, prompts: Path, runs_dir: Path, extra: list[str], resume: bool = False
) -> dict:
    out = runs_dir / f"{preset}-seed{seed}"
    cmd = train_command(preset, seed, epochs, prompts, out, extra, resume)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Python's default bytecode cache: with PYTHONDONTWRITEBYTECODE set (as on the development machine)
    # every run re-compiled torch, diffusers and transformers from source, 21 s of CPU instead of 10.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if not resume and out.exists():
        shutil.rmtree(out)  # a run of an earlier `make bench`: its checkpoints must not be resumed
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with (out.parent / f"{out.name}.log").open("a" if resume else "w") as fh:
        proc = subprocess.run(cmd, cwd=common.REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (out.parent / f"{out.name}.log").read_text()[-2000:]
        raise RuntimeError(f"marble train failed for {preset} seed {seed} (exit {proc.returncode}):\n{tail}")
    summary = json.loads((out / "train_summary.json").read_text())
    return {"preset": preset, "seed": seed, "dir": out, "wall_seconds": seconds, "train_summary": summary}


# The presets the study runs on every seed when the budget cannot hold all presets at that many: the
# default, the exact step solve (the one preset whose applied updates are aligned by construction),
# the plain weighted sum they must beat, and GDPO (what users' other tools ship).
CORE_PRESETS = ("marble", "marble_step", "weighted_sum", "gdpo")
# Paired comparisons (same seeds, same evaluation images): (a, b) reports a - b per seed.
PAIRS = (
    ("marble", "weighted_sum"),
    ("marble_step", "weighted_sum"),
    ("marble_step", "marble"),
    ("marble", "gdpo"),
    ("gdpo", "weighted_sum"),
)

EVAL_RESERVE_FACTOR = 2.0  # an adapter set costs about a base set plus LoRA loading; margin for load spikes
TIME_MARGIN = 1.1  # the resumed phase must fit with 10% to spare


def epochs_that_fit(
    *,
    run_startup_s: float,
    run_epoch_s: float,
    runs: int,
    workers: int,
    seconds_left: float,
    min_epochs: int,
    max_epochs: int,
) -> int:
    """The largest common epoch count in [`min_epochs`, `max_epochs`] whose training fits in `seconds_left`.

    `run_startup_s` (process, model, first rollout's set-up) and `run_epoch_s` are one run's wall-clock
    figures measured by pilot runs trained `workers` at a time, so they carry the parallelism and the
    machine's load; `runs` runs to E epochs, `workers` at a time, cost
    `runs * (startup + E * epoch) / workers`, with TIME_MARGIN to spare.
    """
    if run_epoch_s <= 0 or runs <= 0 or workers <= 0 or seconds_left <= 0:
        return min_epochs
    per_run = seconds_left / TIME_MARGIN * workers / runs
    fit = int((per_run - run_startup_s) // run_epoch_s)
    return max(min_epochs, min(max_epochs, fit))


# ---------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """Base images once; then each adapter on the same prompts and noise (marble.eval.evaluate pieces)."""

    def __init__(self, cfg, prompts: Path, device: str = "cpu", split: str = "test", pipe=None):
        """`pipe`: another Evaluator's pipeline of the same model, shared instead of loaded again (each
        adapter is attached for its own images and removed after)."""
        from marble.eval import evaluate as ev
        from marble.models.loading import load_pipeline

        self.ev, self.cfg, self.device = ev, cfg, device
        self.jobs = ev.eval_jobs(cfg, prompts, split=split)
        self.pipe = pipe if pipe is not None else load_pipeline(cfg.model, device=device)
        self.pipe.set_progress_bar_config(disable=True)
        self.solver = ev.pin_euler_solver(self.pipe)
        seeds = [j["seed"] for j in self.jobs]
        self.noise = ev.initial_noise(seeds, ev.latent_shape(self.pipe, cfg.eval_resolution))  # [N, C, h, w]
        t0 = time.perf_counter()
        self.base_images = self._images()  # [N, 3, H, W] uint8, sampled once
        (base,), _ = ev.score_images(cfg, [self.base_images], self.jobs, device, None)
        self.base = base.reported  # [N, K] the scale `marble evaluate` reports
        self.sample_seconds = time.perf_counter() - t0  # one image set, sampled and scored: sizes the reserve

    def _images(self) -> torch.Tensor:
        c = self.cfg
        return self.ev.generate_images(
            self.pipe, [j["prompt"] for j in self.jobs], self.noise, num_steps=c.eval.num_steps,
            guidance_scale=c.eval.guidance_scale, resolution=c.eval_resolution,
            max_sequence_length=c.model.max_sequence_length, batch_size=c.sampling.batch_size,
        )  # fmt: skip

    def split_scores(self) -> eval_scores.SplitScores:
        """The images' prompts and the base scores, to which the caller adds each adapter's."""
        return eval_scores.SplitScores(
            [j["prompt_id"] for j in self.jobs], [j["prompt"] for j in self.jobs], self.base
        )

    def adapter(self, adapter_dir: Path) -> np.ndarray:
        """Scores `[N, K]` of the adapter's images (same prompts and noise as the base)."""
        self.ev.load_adapter(self.pipe, adapter_dir)
        try:
            images = self._images()
        finally:
            self.pipe.delete_adapters(self.ev.ADAPTER_NAME)
        (base, scores), _ = self.ev.score_images(
            self.cfg, [self.base_images, images], self.jobs, self.device, None
        )
        if not np.array_equal(base.reported, self.base, equal_nan=True):
            raise RuntimeError("base scores changed between evaluations: rewards are not deterministic")
        return scores.reported


def base_conditioning(pipe, cfg, images_per_prompt: int = 2, seed: int = 0) -> dict[str, Any]:
    """How well the base tiny model follows its prompts (`marble conditioning`'s measure): colour and
    position accuracy on colour x shape pairs held out from pretraining, and the VAE's ceiling."""
    from marble.eval.conditioning import world_conditioning

    t0 = time.perf_counter()
    world = world_conditioning(pipe, cfg, images_per_prompt=images_per_prompt, seed=seed)
    return {
        **world.as_dict(),
        "images_per_prompt": images_per_prompt,
        "seed": seed,
        "seconds": time.perf_counter() - t0,
    }


def run_stats(cfg, base: np.ndarray, adapter: np.ndarray) -> dict[str, Any]:
    """Per reward: base/adapter means, paired delta with bootstrap CI, delta in base-std units."""
    from marble.eval.stats import bootstrap_mean_ci, paired_delta_ci

    boot = {"num_samples": cfg.eval.bootstrap_samples, "seed": cfg.eval.seed}
    out = {}
    for k, spec in enumerate(cfg.rewards):
        b, a = base[:, k], adapter[:, k]
        sd = float(np.nanstd(b)) if np.isfinite(b).any() else float("nan")
        d = paired_delta_ci(b, a, **boot)
        out[spec.name] = {
            "held_out": spec.held_out,
            "base": bootstrap_mean_ci(b, **boot).mean,
            "adapter": bootstrap_mean_ci(a, **boot).mean,
            "delta": d.model_dump(),
            "delta_std_units": d.mean / sd if sd > 0 else float("nan"),
        }
    return out


def aggregate(cfg, runs: list[dict[str, Any]], presets: list[str]) -> dict[str, Any]:
    """Per preset: across-seed delta intervals per reward and the 'improves all rewards' flags."""
    trained = cfg.trained_reward_names
    out: dict[str, Any] = {}
    for p in presets:
        mine = [r for r in runs if r["preset"] == p]
        rewards = {}
        for spec in cfg.rewards:
            deltas = [r["eval"][spec.name]["delta"]["mean"] for r in mine]
            units = [r["eval"][spec.name]["delta_std_units"] for r in mine]
            rewards[spec.name] = {
                "held_out": spec.held_out,
                "delta": t_interval(deltas),
                "delta_std_units": t_interval(units),
                "seeds_improved": int(sum(d is not None and d > 0 for d in deltas)),
            }
        improved_mean = [n for n in trained if rewards[n]["delta"]["mean"] > 0]
        improved_ci = [n for n in trained if (rewards[n]["delta"]["ci_lo"] or float("nan")) > 0]
        out[p] = {
            "seeds": [r["seed"] for r in mine],
            "rewards": rewards,
            "improved_trained_mean": improved_mean,
            "improved_trained_ci": improved_ci,
            "improves_all_mean": len(improved_mean) == len(trained),
            "improves_all_ci": len(improved_ci) == len(trained),
            "mean_delta_std_units_trained": float(
                np.nanmean([rewards[n]["delta_std_units"]["mean"] for n in trained])
            ),
            "worst_delta_std_units_trained": float(
                np.nanmin([rewards[n]["delta_std_units"]["mean"] for n in trained])
            ),
            "train_seconds_median": float(np.median([r["train_seconds"] for r in mine])),
        }
    return out


def paired(cfg, runs: list[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """`a` minus `b` on the seeds both ran (same seed, same evaluation images): per reward, the per-seed
    differences of the delta in base-std units, their mean and 95% t-interval. `a_better_all_ci`: every
    trained reward's interval lies above zero."""
    by = {(r["preset"], r["seed"]): r for r in runs}
    seeds = sorted(s for (p, s) in by if p == a and (b, s) in by)
    if not seeds:
        return None
    rewards = {}
    for spec in cfg.rewards:
        diffs = [
            by[(a, s)]["eval"][spec.name]["delta_std_units"]
            - by[(b, s)]["eval"][spec.name]["delta_std_units"]
            for s in seeds
        ]
        rewards[spec.name] = {"held_out": spec.held_out, "per_seed": diffs, "diff": t_interval(diffs)}
    trained = cfg.trained_reward_names
    return {
        "a": a,
        "b": b,
        "seeds": seeds,
        "rewards": rewards,
        "a_better_trained_ci": [n for n in trained if (rewards[n]["diff"]["ci_lo"] or float("nan")) > 0],
        "a_worse_trained_ci": [n for n in trained if (rewards[n]["diff"]["ci_hi"] or float("nan")) < 0],
    }


# ---------------------------------------------------------------------------------------- run
def job_list(presets: list[str], seeds: list[int], other_seeds: list[int] | None, core: list[str]) -> list:
    """(preset, seed) pairs: every seed for the `core` presets, `other_seeds` (default: the same) for
    the rest, seed-major so that each seed's runs of all presets train side by side."""
    others = seeds if other_seeds is None else other_seeds
    mine = {p: seeds if p in core else others for p in presets}
    return [(p, s) for s in sorted({*seeds, *others}) for p in presets if s in mine[p]]


def run(
    cfg,
    work: Path,
    *,
    presets: list[str],
    seeds: list[int],
    other_seeds: list[int] | None = None,
    core: list[str] = CORE_PRESETS,
    paired_with: list[tuple[str, str]] = PAIRS,
    epochs: int,
    max_epochs: int | None = None,
    budget_s: float | None = None,
    workers: int = 2,
    images_per_prompt: int = 4,
    threads: int = 2,
    extra: list[str] | None = None,
    train_split: bool = True,
) -> dict[str, Any]:
    """Train every (preset, seed) (`seeds` for the `core` presets, `other_seeds` for the rest) for
    `epochs`; or, with `max_epochs` and `budget_s`: train the first `workers` runs for `epochs` (a pilot
    measuring one run's start-up and epoch cost here and now), then every run to the largest common
    epoch count <= `max_epochs` that fits in what is left of `budget_s` (seconds from the start of this
    call, evaluation included; the pilot runs resume their checkpoints). All runs end with the same
    number of steps. `train_split`: the `core` presets' adapters are also evaluated, the same way, on
    the training prompts (a gap between the two splits is not what training did to the rewards)."""
    t_start = time.perf_counter()
    load_start = common.load_average()
    other_seeds = seeds if other_seeds is None else other_seeds
    extra = list(extra or [])
    eval_cfg = common.bench_config("marble", [*extra, f"eval.images_per_prompt={images_per_prompt}"])
    prompts = common.prepare_prompts(eval_cfg, work)
    runs_dir = work / "reward_balance"
    with pinned_threads(threads):
        t0 = time.perf_counter()
        evaluator = Evaluator(eval_cfg, prompts)  # base images first: their cost sizes the eval reserve
        eval_base_s = time.perf_counter() - t0
        conditioning = base_conditioning(evaluator.pipe, eval_cfg)
        train_evaluator = (
            Evaluator(eval_cfg, prompts, split="train", pipe=evaluator.pipe) if train_split else None
        )
    # the presets' runs, then one base run per seed (`bench.rollouts_vs_base`: their training rewards are
    # read against the base's on the same rollouts); the pilot's runs are the first presets'
    jobs = [*job_list(presets, seeds, other_seeds, list(core)), *((BASE, s) for s in seeds)]
    evaluated = sum(p != BASE for p, _ in jobs)
    on_train_split = [(p, s) for p, s in jobs if p in core] if train_split else []
    phases = []

    def train_jobs(todo: list[tuple[str, int]], n_epochs: int, resumed: set) -> list[dict]:
        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [
                pool.submit(train_one, p, s, n_epochs, prompts, runs_dir, extra, (p, s) in resumed)
                for p, s in todo
            ]
            out = [f.result() for f in futures]
        phases.append({"runs": len(todo), "epochs": n_epochs, "seconds": time.perf_counter() - t})
        return out

    final_epochs = epochs
    if max_epochs is not None and budget_s is not None and max_epochs > epochs:
        # pilot: the first `workers` runs, side by side, measure what one run costs here and now
        pilot = jobs[:workers]
        piloted = train_jobs(pilot, epochs, set())
        eval_reserve = EVAL_RESERVE_FACTOR * (
            evaluator.sample_seconds * evaluated
            + (train_evaluator.sample_seconds * len(on_train_split) if train_evaluator else 0.0)
        )
        left = budget_s - (time.perf_counter() - t_start) - eval_reserve
        startup = float(np.mean([t["wall_seconds"] - t["train_summary"]["train_seconds"] for t in piloted]))
        per_epoch = float(np.mean([t["train_summary"]["train_seconds"] for t in piloted])) / epochs
        final_epochs = epochs_that_fit(
            run_startup_s=startup, run_epoch_s=per_epoch, runs=len(jobs), workers=workers,
            seconds_left=left, min_epochs=epochs, max_epochs=max_epochs,
        )  # fmt: skip
        log.info(
            "reward balance: pilot of %d runs (per run: %.1f s start-up, %.1f s per epoch); %.0f s left after "
            "a %.0f s evaluation reserve -> %d runs to %d epochs",
            len(pilot), startup, per_epoch, left, eval_reserve, len(jobs), final_epochs,
        )  # fmt: skip
        if final_epochs == epochs:
            rest = train_jobs(jobs[len(pilot) :], epochs, set())
            trained = [*piloted, *rest]
        else:  # the pilot runs resume from their checkpoints; the others start fresh
            trained = train_jobs(jobs, final_epochs, set(pilot))
    else:
        trained = train_jobs(jobs, epochs, set())
    t_trained = time.perf_counter()
    load_train = common.load_average()
    held_out_scores = evaluator.split_scores()
    train_scores = train_evaluator.split_scores() if train_evaluator is not None else None
    with pinned_threads(threads):
        runs = []
        for t in (t for t in trained if t["preset"] != BASE):  # the base runs' adapters are zero
            scores = evaluator.adapter(t["dir"] / "adapter")
            held_out_scores.runs[(t["preset"], t["seed"])] = scores
            ts = t["train_summary"]
            runs.append(
                {
                    "preset": t["preset"],
                    "seed": t["seed"],
                    "train_seconds": ts.get("train_seconds"),
                    "wall_seconds": t["wall_seconds"],
                    "steps": ts.get("steps"),
                    "skipped_steps": ts.get("skipped_steps"),
                    "train_reward_first": ts.get("reward_first"),
                    "train_reward_last": ts.get("reward_last"),
                    "eval": run_stats(eval_cfg, evaluator.base, scores),
                }
            )
        train_runs = []
        for t in trained:
            if train_evaluator is None or (t["preset"], t["seed"]) not in on_train_split:
                continue
            scores = train_scores.runs[(t["preset"], t["seed"])] = train_evaluator.adapter(
                t["dir"] / "adapter"
            )
            train_runs.append(
                {"preset": t["preset"], "seed": t["seed"], "train_seconds": t["train_summary"].get("train_seconds"),
                 "eval": run_stats(eval_cfg, train_evaluator.base, scores)}
            )  # fmt: skip
    # every image's scores, for readings per prompt without a second evaluation (bench.prompt_level)
    eval_scores.save(
        runs_dir / eval_scores.SCORES_FILE,
        [r.name for r in eval_cfg.rewards],
        {"test": held_out_scores, **({"train": train_scores} if train_scores is not None else {})},
    )
    base_means = {
        spec.name: float(np.nanmean(evaluator.base[:, k]))
        if np.isfinite(evaluator.base[:, k]).any()
        else None
        for k, spec in enumerate(eval_cfg.rewards)
    }
    return {
        "benchmark": "reward_balance",
        **common.environment(),
        "load_average": {"start": load_start, "after_training": load_train, "end": common.load_average()},
        "settings": {
            "config": str(common.TINY_CONFIG.relative_to(common.REPO)),
            "presets": presets,
            "seeds": seeds,
            "other_seeds": other_seeds,
            "core_presets": list(core),
            "seeds_per_preset": {p: [s for q, s in jobs if q == p] for p in presets},
            "epochs": final_epochs,
            "epochs_pilot": epochs,
            "max_epochs": max_epochs,
            "budget_s": budget_s,
            "training_phases": phases,
            "eval_base_seconds": eval_base_s,
            "eval_base_sample_seconds": evaluator.sample_seconds,
            "optimizer_steps": trained[0]["train_summary"].get("steps") if trained else None,
            "workers": workers,
            "worker_torch_threads": 1,
            "eval_images": len(evaluator.jobs),
            "eval_prompts": len({j["prompt_id"] for j in evaluator.jobs}),
            "eval_images_per_prompt": images_per_prompt,
            "eval_num_steps": eval_cfg.eval.num_steps,
            "eval_seeds": [j["seed"] for j in evaluator.jobs],
            "eval_weights": "ema" if eval_cfg.train.export_ema else "trainable",
            "rewards_trained": eval_cfg.trained_reward_names,
            "rewards_held_out": [r.name for r in eval_cfg.rewards if r.held_out],
            "extra_overrides": extra,
        },
        "base_means": base_means,
        "train_wall_seconds": t_trained - t_start,
        "wall_seconds": time.perf_counter() - t_start,
        "conditioning": conditioning,
        "presets": aggregate(eval_cfg, runs, presets),
        "train_split": None
        if train_evaluator is None
        else {
            "images": len(train_evaluator.jobs),
            "prompts": len({j["prompt_id"] for j in train_evaluator.jobs}),
            "presets": aggregate(eval_cfg, train_runs, [p for p in presets if p in core]),
        },
        "rollouts_vs_base": rollouts_vs_base.study(runs_dir, presets, seeds, eval_cfg.trained_reward_names),
        "paired": [c for a, b in paired_with if (c := paired(eval_cfg, runs, a, b)) is not None],
        "runs": runs,
    }


def seed_note(settings: dict[str, Any], markdown: bool = False) -> str:
    """`[0, 1, 2]`, or `[0, ..., 5] (marble, weighted_sum, gdpo), [0, 1] (others)` when they differ
    (`markdown`: preset names as code, for the README)."""
    seeds, others = settings["seeds"], settings.get("other_seeds", settings["seeds"])
    if others == seeds:
        return str(seeds)
    names = ", ".join(f"`{p}`" if markdown else p for p in settings["core_presets"])
    return f"{seeds} ({names}), {others} (others)"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Delta vs base (base-std units) per reward and preset, seed mean with the across-seed interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(result["presets"])
    rewards = list(result["presets"][presets[0]]["rewards"])
    fig, ax = plt.subplots(figsize=(12, 4.5))
    width = 0.8 / len(presets)
    x = np.arange(len(rewards))
    for i, p in enumerate(presets):
        r = result["presets"][p]["rewards"]
        m = np.array([r[k]["delta_std_units"]["mean"] for k in rewards], dtype=float)
        lo = np.array([r[k]["delta_std_units"]["ci_lo"] for k in rewards], dtype=float)
        hi = np.array([r[k]["delta_std_units"]["ci_hi"] for k in rewards], dtype=float)
        err = np.vstack([np.nan_to_num(m - lo), np.nan_to_num(hi - m)])
        ax.bar(x + (i - len(presets) / 2 + 0.5) * width, m, width, yerr=err, capsize=2, label=p)
        for run in (q for q in result["runs"] if q["preset"] == p):
            ys = [run["eval"][k]["delta_std_units"] for k in rewards]
            ax.scatter(x + (i - len(presets) / 2 + 0.5) * width, ys, s=6, color="k", zorder=3)
    ax.axhline(0, color="k", lw=0.6)
    labels = [
        f"{k}\n(held out)" if result["presets"][presets[0]]["rewards"][k]["held_out"] else k for k in rewards
    ]
    ax.set_xticks(x, labels)
    ax.set_ylabel("adapter - base (base std units)")
    s = result["settings"]
    ax.set_title(
        f"held-out prompts, {s['optimizer_steps']} optimizer steps, seeds {seed_note(s)} "
        "(bars: seed mean, whiskers: 95% t-interval, dots: runs)",
        fontsize=9,
    )
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--epochs",
        type=int,
        default=20,
        help="epochs (= optimizer steps on configs/tiny.yaml); the pilot's with --max-epochs",
    )
    ap.add_argument(
        "--max-epochs", type=int, help="train every run up to this many epochs if --budget allows"
    )
    ap.add_argument("--budget", type=float, help="seconds this study may take (with --max-epochs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the --core presets")
    ap.add_argument(
        "--other-seeds", type=int, nargs="+", help="seeds of the other presets (default: --seeds)"
    )
    ap.add_argument("--core", nargs="+", default=list(CORE_PRESETS), help="presets run on every --seeds")
    ap.add_argument("--presets", nargs="+", default=list(common.PRESETS))
    ap.add_argument("--workers", type=int, default=2, help="concurrent training processes (1 thread each)")
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the evaluation")
    ap.add_argument(
        "--no-train-split",
        action="store_true",
        help="skip evaluating the core presets on the training prompts",
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--work", type=Path, default=common.WORK_DIR)
    ap.add_argument("--out", type=Path, default=OUT_JSON)
    args = ap.parse_args(argv)
    cfg = common.bench_config("marble", args.overrides)
    result = run(
        cfg, args.work, presets=args.presets, seeds=args.seeds, other_seeds=args.other_seeds,
        core=args.core, epochs=args.epochs,
        max_epochs=args.max_epochs, budget_s=args.budget, workers=args.workers,
        images_per_prompt=args.images_per_prompt, threads=args.threads, extra=args.overrides,
        train_split=not args.no_train_split,
    )  # fmt: skip
    common.write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    names = list(result["presets"][args.presets[0]]["rewards"])
    names_trained = cfg.trained_reward_names
    print("reward balance: delta vs base in base-std units, mean over seeds [95% t-interval across seeds]")
    print("  " + f"{'preset':13s}" + "".join(f"{n[:14]:>24s}" for n in names) + "  all>0  all CI>0")
    for p, s in result["presets"].items():
        cells = []
        for n in names:
            d = s["rewards"][n]["delta_std_units"]
            cells.append(f"{d['mean']:+.2f} [{d['ci_lo']:+.2f},{d['ci_hi']:+.2f}]")
        print(
            "  "
            + f"{p:13s}"
            + "".join(f"{c:>24s}" for c in cells)
            + f"  {str(s['improves_all_mean']):5s}  {s['improves_all_ci']}"
        )
    for c in result["paired"]:
        cells = [f"{n} {_fmt(c['rewards'][n]['diff'])}" for n in names]
        print(f"  paired {c['a']} - {c['b']} (seeds {c['seeds']}): " + ", ".join(cells))
    if result["train_split"]:
        ts = result["train_split"]
        for p, s in ts["presets"].items():
            cells = [f"{n} {_fmt(s['rewards'][n]['delta_std_units'])}" for n in names]
            print(f"  training prompts ({ts['images']} images) {p}: " + ", ".join(cells))
    rvb = result["rollouts_vs_base"]
    for p, r in rvb["presets"].items():
        last = r["rewards"][names_trained[0]]["last"]["steps"]
        cells = [f"{n} {_fmt(r['rewards'][n]['last'], '+.3f')}" for n in names_trained]
        print(f"  training rollouts {p} - base, steps {last[0]}-{last[1]}: " + ", ".join(cells))
    cond = result["conditioning"]
    print(
        f"  world: colour accuracy {cond['color']:.0%}, position accuracy {cond['position']:.0%} (base model)"
    )
    print(f"wrote {args.out}")
    return result


def _fmt(d: dict[str, float], spec: str = "+.2f") -> str:
    return f"{d['mean']:{spec}} [{d['ci_lo']:{spec}},{d['ci_hi']:{spec}}]"


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
