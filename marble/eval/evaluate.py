"""The evaluate stage: base model vs. adapter on held-out prompts, same seeds, every reward.

How (docs/evaluation.md; the paper's protocol: docs/algorithm.md §7):
- prompts: `<prompts_dir>/test.jsonl` (the first `eval.num_prompts`, all by default), each with
  `eval.images_per_prompt` fixed seeds `eval.seed + j`;
- sampling pinned: the stock diffusers SD3 pipeline, Euler flow-matching solver, `eval.num_steps`,
  `eval.guidance_scale`, `cfg.eval_resolution`. The initial noise of every image is drawn once on the
  CPU from its seed and given to both models, so base and adapter differ only by the adapter;
- one pipeline load: base images first, then `pipe.load_lora_weights(adapter_dir)` (the same stock
  call a user makes) and the adapter images;
- every reward (trained and held out) scores both image sets on the scale its paper reports (GenEval's
  binary accuracy, PickScore's raw logit scale; the training scale otherwise), with the training scale
  kept beside it; per reward: means with 95% bootstrap CIs, the paired delta with its CI, the win
  rate; hacking monitors vs. the base; the composite z-score over the two models; a preview of the
  promotion gate (without the champion), all in the typed contract `marble.eval.contract.EvalSummary`;
- outputs are written to a temporary directory and renamed over `out_dir` at the end, so a failed or
  interrupted evaluation never leaves a half-written report next to valid metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marble.config import MarbleConfig
from marble.errors import CheckpointError, DataError
from marble.eval import monitors as mon
from marble.eval.contract import (
    AdapterEffect,
    Composite,
    CompositeScore,
    EvalScores,
    EvalSummary,
    FamilyMeans,
    MeanPair,
    MonitorResult,
    RewardResult,
    SamplingInfo,
    ScaleStats,
)
from marble.eval.gate import evaluate_gate
from marble.eval.lineage import collect_lineage
from marble.eval.stats import bootstrap_mean_ci, composite_zscores, paired_delta_ci, win_rate
from marble.hub import Hub
from marble.images import to_float, to_uint8
from marble.io import atomic_write_text, staged_dir

log = logging.getLogger(__name__)

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "marble"


# --------------------------------------------------------------------------------------- inputs
def eval_jobs(cfg: MarbleConfig, prompts_dir: Path, split: str = "test") -> list[dict[str, Any]]:
    """One job per (held-out prompt, seed): index, seed, prompt id/text/family/metadata. `split="train"`:
    the training prompts instead, to tell a gap between the two splits from what training did."""
    from marble.data.prepare import load_prepared

    if split not in ("test", "train"):
        raise ValueError(f"eval_jobs: split must be 'test' or 'train', got {split!r}")
    # load_prepared refuses a split modified after `marble prepare`: the recorded data hash must
    # describe exactly the prompts evaluated.
    train, test, _ = load_prepared(prompts_dir)
    records = test if split == "test" else train
    if not records:
        raise DataError(
            f"{prompts_dir / f'{split}.jsonl'}: no prompts to evaluate"
            + (" (data.test_fraction?)" if split == "test" else "")
        )
    if cfg.eval.num_prompts is not None:
        records = records[: cfg.eval.num_prompts]
    jobs = []
    for rec in records:
        for _ in range(cfg.eval.images_per_prompt):
            j = len(jobs)
            jobs.append(
                {
                    "index": j,
                    "seed": cfg.eval.seed + j,
                    "prompt_id": rec.id,
                    "prompt": rec.prompt,
                    "family": rec.family,
                    "metadata": dict(rec.metadata),
                }
            )
    return jobs


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """The starting latents of every image, one CPU generator per seed: [N, C, h, w] float32.

    Drawn on the CPU so the same seed gives the same noise on any device, for base and adapter alike.
    """
    out = torch.empty(len(seeds), *shape)
    for i, s in enumerate(seeds):
        out[i] = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)))
    return out  # [N, C, h, w]


# ------------------------------------------------------------------------------------- sampling
def pin_euler_solver(pipe) -> dict[str, Any]:
    """Make sure the pipeline samples with the flow-matching Euler solver; returns what is pinned."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
        log.info("replacing %s with FlowMatchEulerDiscreteScheduler", type(pipe.scheduler).__name__)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return {"solver": type(pipe.scheduler).__name__, "shift": float(pipe.scheduler.config.get("shift", 1.0))}


def latent_shape(pipe, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) of the transformer's input for square `resolution` px images."""
    side = resolution // int(pipe.vae_scale_factor)
    return (int(pipe.transformer.config.in_channels), side, side)


@torch.no_grad()
def generate_images(
    pipe,
    prompts: list[str],
    noise: torch.Tensor,
    *,
    num_steps: int,
    guidance_scale: float,
    resolution: int,
    max_sequence_length: int,
    batch_size: int,
) -> torch.Tensor:
    """Stock pipeline call in batches from given starting latents: 8-bit images [N, 3, H, W] uint8 (CPU).

    Quantised to 8 bits at once: the scores are then computed on exactly the pixels saved as PNG (anyone
    can re-score the saved images and get the same numbers), and a large evaluation holds a quarter of
    the memory (2,000 pairs at 512 px: 3 GB instead of 12 GB).
    """
    device = pipe.transformer.device
    dtype = pipe.transformer.dtype
    chunks = []
    for start in range(0, len(prompts), batch_size):
        sl = slice(start, start + batch_size)
        out = pipe(
            prompt=prompts[sl],
            height=resolution,
            width=resolution,
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            latents=noise[sl].to(device, dtype),
            max_sequence_length=max_sequence_length,
            output_type="pt",
        )
        chunks.append(to_uint8(out.images.detach().float().cpu()))  # [b, 3, H, W]
    return torch.cat(chunks)  # [N, 3, H, W] uint8


def load_adapter(pipe, adapter_dir: Path) -> None:
    """Stock `pipe.load_lora_weights(adapter_dir)` through the models package, which refuses a load
    that attached nothing (a PEFT-format directory silently loads no weights: docs/library-notes.md)."""
    from marble.models.lora import load_adapter_into_pipeline

    if not (adapter_dir / ADAPTER_FILE).is_file():
        raise CheckpointError(
            f"{adapter_dir}: no {ADAPTER_FILE}; expected a directory written by the train stage"
        )
    load_adapter_into_pipeline(pipe, adapter_dir, ADAPTER_NAME)
    pipe.set_adapters([ADAPTER_NAME], adapter_weights=[1.0])


def sample_both(
    cfg: MarbleConfig, adapter_dir: Path, jobs: list[dict[str, Any]], device: str, hub: Hub | None = None
):
    """Base images, then adapter images, from one pipeline load: ([N,3,H,W], [N,3,H,W], sampling info).

    `hub`: the run's model access (the cache stage snapshots the base model too), see `marble.hub`.
    """
    from marble.models.loading import load_pipeline

    pipe = load_pipeline(cfg.model, device=device, hub=hub)
    pipe.set_progress_bar_config(disable=True)
    solver = pin_euler_solver(pipe)
    res = cfg.eval_resolution
    noise = initial_noise([j["seed"] for j in jobs], latent_shape(pipe, res))  # [N, C, h, w]
    kwargs = {
        "num_steps": cfg.eval.num_steps,
        "guidance_scale": cfg.eval.guidance_scale,
        "resolution": res,
        "max_sequence_length": cfg.model.max_sequence_length,
        "batch_size": cfg.sampling.batch_size,
    }
    prompts = [j["prompt"] for j in jobs]
    t0 = time.perf_counter()
    base = generate_images(pipe, prompts, noise, **kwargs)
    t1 = time.perf_counter()
    load_adapter(pipe, adapter_dir)
    adapted = generate_images(pipe, prompts, noise, **kwargs)
    t2 = time.perf_counter()
    info = {
        **solver,
        "num_steps": cfg.eval.num_steps,
        "guidance_scale": cfg.eval.guidance_scale,
        "resolution": res,
        "batch_size": cfg.sampling.batch_size,
        "device": device,
        "dtype": cfg.model.dtype,
        "seeds": [j["seed"] for j in jobs],
        "seconds_base": round(t1 - t0, 3),
        "seconds_adapter": round(t2 - t1, 3),
    }
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the reward models come next
    return base, adapted, info


# ---------------------------------------------------------------------------------------- scores
SCORE_CHUNK = 256
"""Images converted to float and scored at a time (each reward batches further by its batch_size)."""


@dataclass
class ImageScores:
    """Every reward's scores of one image set, on both scales: `[N, K]` float64, columns in config
    order, NaN = does not apply."""

    reported: np.ndarray  # [N, K] the score each reward's paper reports (score_all mode="eval")
    training: np.ndarray  # [N, K] the training score (mode="train")


def score_images(
    cfg: MarbleConfig,
    image_sets: Sequence[torch.Tensor],
    jobs: list[dict],
    device: str,
    hub: Hub | None,
) -> tuple[list[ImageScores], list[str]]:
    """Score each uint8 image set (all for the same `jobs`) with every reward, loaded once.

    Returns one `ImageScores` per set and, per reward, the name of its reported scale ("training", or its
    `eval_extra`: GenEval's "binary" accuracy, PickScore's "raw" logit scale).
    """
    from marble.rewards.registry import build_rewards, score_modes

    rewards = build_rewards(cfg.rewards)
    for r in rewards:
        r.setup(device, hub)
    prompts = [j["prompt"] for j in jobs]
    meta = [j["metadata"] for j in jobs]

    def score(images: torch.Tensor) -> ImageScores:
        parts = [
            score_modes(rewards, to_float(images[a : a + SCORE_CHUNK]).to(device), prompts[a : a + SCORE_CHUNK],
                        meta[a : a + SCORE_CHUNK])
            for a in range(0, len(jobs), SCORE_CHUNK)
        ]  # fmt: skip
        return ImageScores(
            reported=torch.cat([p["eval"] for p in parts]).numpy(),  # [N, K]
            training=torch.cat([p["train"] for p in parts]).numpy(),  # [N, K]
        )

    scales = [getattr(r, "eval_extra", None) or "training" for r in rewards]
    return [score(images) for images in image_sets], scales


def monitor_images(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Hacking monitors of uint8 images in chunks: name -> [N]."""
    parts = [
        mon.compute_monitors(to_float(images[a : a + SCORE_CHUNK]))
        for a in range(0, len(images), SCORE_CHUNK)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def scale_stats(base: np.ndarray, adapter: np.ndarray, num_samples: int, seed: int) -> ScaleStats:
    """Base vs. adapter on one scale of one reward: `[N]` scores each, NaN = not scored."""
    boot = {"num_samples": num_samples, "seed": seed}
    finite_b = base[np.isfinite(base)]
    return ScaleStats(
        base=bootstrap_mean_ci(base, **boot),
        adapter=bootstrap_mean_ci(adapter, **boot),
        base_std=float(finite_b.std()) if finite_b.size else float("nan"),
        delta=paired_delta_ci(base, adapter, **boot),
        win_rate=win_rate(base, adapter),
    )


def summarize(
    cfg: MarbleConfig,
    base: ImageScores,
    adapter: ImageScores,
    scales: list[str],
    base_mon: dict[str, np.ndarray],
    adapter_mon: dict[str, np.ndarray],
    jobs: list[dict[str, Any]],
) -> EvalScores:
    """Per-reward statistics on both scales, monitors, composite and per-family means."""
    n_boot, seed = cfg.eval.bootstrap_samples, cfg.eval.seed
    rewards: dict[str, RewardResult] = {}
    for k, spec in enumerate(cfg.rewards):
        reported = scale_stats(base.reported[:, k], adapter.reported[:, k], n_boot, seed)
        training = None
        if scales[k] != "training":
            training = scale_stats(base.training[:, k], adapter.training[:, k], n_boot, seed)
        rewards[spec.name] = RewardResult(
            kind=spec.kind, held_out=spec.held_out, scale=scales[k], training=training, **dict(reported)
        )
    monitors = {}
    for name in base_mon:
        bi = bootstrap_mean_ci(base_mon[name], num_samples=n_boot, seed=seed)
        ai = bootstrap_mean_ci(adapter_mon[name], num_samples=n_boot, seed=seed)
        monitors[name] = MonitorResult(
            base=bi, adapter=ai, relative_shift=mon.relative_shift(bi.mean, ai.mean)
        )
    return EvalScores(
        rewards=rewards,
        monitors=monitors,
        composite=composite(rewards),
        by_family=by_family(cfg, base.reported, adapter.reported, jobs),
    )


def composite(rewards: dict[str, RewardResult]) -> Composite:
    """Mean z-score over rewards of the compared models (base, adapter), population std, as the paper."""
    out: dict[str, CompositeScore] = {}
    for label, names in (
        ("all", list(rewards)),
        ("trained", [n for n, r in rewards.items() if not r.held_out]),
    ):
        cols = [n for n in names if math.isfinite(rewards[n].base.mean)]
        if not cols:
            out[label] = CompositeScore(base=float("nan"), adapter=float("nan"), rewards=[])
            continue
        table = np.array([[getattr(rewards[n], m).mean for n in cols] for m in ("base", "adapter")])  # [2, K]
        z = composite_zscores(table)  # [2]
        out[label] = CompositeScore(base=float(z[0]), adapter=float(z[1]), rewards=cols)
    return Composite(**out)


def by_family(
    cfg: MarbleConfig, base: np.ndarray, adapter: np.ndarray, jobs: list[dict]
) -> dict[str, FamilyMeans]:
    """Reported-scale reward means per prompt family (a specialist's gain shows on its own family)."""
    fams = np.array([j["family"] for j in jobs])
    out: dict[str, FamilyMeans] = {}
    for fam in sorted(set(fams.tolist())):
        m = fams == fam
        means = {
            spec.name: MeanPair(base=float(np.nanmean(base[m, k])), adapter=float(np.nanmean(adapter[m, k])))
            for k, spec in enumerate(cfg.rewards)
            if np.isfinite(base[m, k]).any()
        }
        out[fam] = FamilyMeans(n=int(m.sum()), rewards=means)
    return out


# ---------------------------------------------------------------------------------------- outputs
def _json_line(obj: Any) -> str:
    """One line of strict JSON: NaN/inf become null (JSON has no NaN)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), separators=(",", ":"), allow_nan=False) + "\n"


def save_images(images: torch.Tensor, out: Path) -> None:
    """[N, 3, H, W] uint8 -> out/0000.png ..."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    arr = images.permute(0, 2, 3, 1).numpy()  # [N, H, W, 3] uint8
    for i, a in enumerate(arr):
        Image.fromarray(a).save(out / f"{i:04d}.png")


def sample_rows(cfg, jobs, base: ImageScores, adapter: ImageScores, base_mon, adapter_mon) -> str:
    """samples.jsonl: one line per image pair with every score on both scales (for drill-down and audits)."""
    names = [s.name for s in cfg.rewards]
    lines = []
    for i, j in enumerate(jobs):
        row = {k: j[k] for k in ("index", "seed", "prompt_id", "prompt", "family")}
        row["base"] = dict(zip(names, base.reported[i].tolist(), strict=True))
        row["adapter"] = dict(zip(names, adapter.reported[i].tolist(), strict=True))
        row["training_base"] = dict(zip(names, base.training[i].tolist(), strict=True))
        row["training_adapter"] = dict(zip(names, adapter.training[i].tolist(), strict=True))
        row["monitors_base"] = {m: float(v[i]) for m, v in base_mon.items()}
        row["monitors_adapter"] = {m: float(v[i]) for m, v in adapter_mon.items()}
        lines.append(_json_line(row))
    return "".join(lines)


def run_evaluation(
    cfg: MarbleConfig,
    prompts_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    hub: Hub | None = None,
    train_dir: Path | None = None,
) -> Path:
    """The evaluate stage (see the module docstring). Returns `<out_dir>/metrics.json`."""
    prompts_dir, adapter_dir, out_dir = Path(prompts_dir), Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / ADAPTER_FILE).is_file():
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_FILE}; run `marble train` first or pass --adapter")
    jobs = eval_jobs(cfg, prompts_dir)
    hub = hub or Hub.create(offline=cfg.model.offline)
    lineage = collect_lineage(cfg, prompts_dir, adapter_dir, hub)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_prompts = len({j["prompt_id"] for j in jobs})
    log.info("evaluating %d images (%d prompts) on %s", len(jobs), num_prompts, device)
    base_img, adapter_img, sampling = sample_both(cfg, adapter_dir, jobs, device, hub)
    (base, adapter), scales = score_images(cfg, [base_img, adapter_img], jobs, device, hub)
    base_mon, adapter_mon = monitor_images(base_img), monitor_images(adapter_img)
    scores = summarize(cfg, base, adapter, scales, base_mon, adapter_mon, jobs)
    pixel_diff = float((adapter_img.int() - base_img.int()).abs().max()) / 255.0
    if pixel_diff == 0.0:
        log.warning("the adapter did not change a single pixel: an untrained (zero) adapter?")
    summary = EvalSummary(
        **dict(scores),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        lineage=lineage,
        sampling=SamplingInfo(**sampling, images_per_prompt=cfg.eval.images_per_prompt),
        num_prompts=num_prompts,
        num_images=len(jobs),
        adapter_effect=AdapterEffect(max_abs_pixel_diff=pixel_diff),
        gate_preview=evaluate_gate(scores, cfg.eval.gate),
    )
    samples = sample_rows(cfg, jobs, base, adapter, base_mon, adapter_mon)
    write_outputs(out_dir, summary, samples, jobs, base_img, adapter_img, cfg.eval.grid_prompts, train_dir)
    log.info("evaluation written to %s (gate preview: %s)", out_dir, summary.gate_preview.summary())
    return out_dir / "metrics.json"


def write_outputs(
    out_dir: Path,
    summary: EvalSummary,
    samples: str,
    jobs: list[dict[str, Any]],
    base_img: torch.Tensor,
    adapter_img: torch.Tensor,
    grid_prompts: int,
    train_dir: Path | None,
) -> None:
    """Write everything into a temporary sibling of `out_dir`, then swap it in whole."""
    from marble.eval.report import write_report

    with staged_dir(out_dir) as tmp:
        save_images(base_img, tmp / "images" / "base")
        save_images(adapter_img, tmp / "images" / "adapter")
        summary.write(tmp / "eval.json")
        metrics = json.dumps(summary.flat_metrics(), indent=2, allow_nan=False) + "\n"
        atomic_write_text(tmp / "metrics.json", metrics)
        atomic_write_text(tmp / "samples.jsonl", samples)
        write_report(tmp, summary, jobs, base_img, adapter_img, grid_prompts, train_dir)
