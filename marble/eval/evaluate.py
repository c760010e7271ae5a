"""The evaluate stage: base model vs. adapter on held-out prompts, same seeds, every reward.

How (issue 7, docs/algorithm.md §7):
- prompts: `<prompts_dir>/test.jsonl` (the first `eval.num_prompts`, all by default), each with
  `eval.images_per_prompt` fixed seeds `eval.seed + j`;
- sampling pinned: the stock diffusers SD3 pipeline, Euler flow-matching solver, `eval.num_steps`,
  `eval.guidance_scale`, `cfg.eval_resolution`. The initial noise of every image is drawn once on the
  CPU from its seed and given to both models, so base and adapter differ only by the adapter;
- one pipeline load: base images first, then `pipe.load_lora_weights(adapter_dir)` (the same stock
  call a user makes) and the adapter images;
- every reward (trained and held out) scores both image sets; per reward: means with 95% bootstrap
  CIs, the paired delta with its CI, the win rate; hacking monitors vs. the base; the composite
  z-score over the two models; a preview of the promotion gate (without the champion);
- outputs are written to a temporary directory and renamed over `out_dir` at the end, so a failed or
  interrupted evaluation never leaves a half-written report next to valid metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from marble.config import MarbleConfig
from marble.errors import CheckpointError, DataError
from marble.eval import monitors as mon
from marble.eval.gate import evaluate_gate
from marble.eval.lineage import collect_lineage
from marble.eval.stats import bootstrap_mean_ci, composite_zscores, paired_delta_ci, win_rate
from marble.hub import Hub
from marble.images import to_float, to_uint8
from marble.io import atomic_write_text, staged_dir

log = logging.getLogger(__name__)

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "marble"
SCHEMA_VERSION = 1


# --------------------------------------------------------------------------------------- inputs
def eval_jobs(cfg: MarbleConfig, prompts_dir: Path) -> list[dict[str, Any]]:
    """One job per (held-out prompt, seed): index, seed, prompt id/text/family/metadata."""
    from marble.data.prepare import load_prepared

    # load_prepared refuses a test split modified after `marble prepare`: the recorded data hash
    # must describe exactly the prompts evaluated.
    _, records, _ = load_prepared(prompts_dir)
    if not records:
        raise DataError(
            f"{prompts_dir / 'test.jsonl'}: no held-out prompts to evaluate (data.test_fraction?)"
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
    that attached nothing (STACK-NOTES: a PEFT-format directory silently loads no weights)."""
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


def score_images(
    cfg: MarbleConfig,
    image_sets: Sequence[torch.Tensor],
    jobs: list[dict],
    device: str,
    hub: Hub | None,
) -> list[np.ndarray]:
    """Every reward's scores of each uint8 image set (all for the same `jobs`): one `[N, K]` float64
    array per set, columns in config order, NaN = does not apply. Reward weights are loaded once."""
    from marble.rewards.registry import build_rewards, score_all

    rewards = build_rewards(cfg.rewards)
    for r in rewards:
        r.setup(device, hub)
    prompts = [j["prompt"] for j in jobs]
    meta = [j["metadata"] for j in jobs]

    def score(images: torch.Tensor) -> np.ndarray:
        out = []
        for a in range(0, len(jobs), SCORE_CHUNK):
            sl = slice(a, a + SCORE_CHUNK)
            out.append(
                score_all(rewards, to_float(images[sl]).to(device), prompts[sl], meta[sl]).cpu()
            )  # [n, K]
        return torch.cat(out).numpy()  # [N, K]

    return [score(images) for images in image_sets]


def monitor_images(images: torch.Tensor) -> dict[str, np.ndarray]:
    """Hacking monitors of uint8 images in chunks: name -> [N]."""
    parts = [
        mon.compute_monitors(to_float(images[a : a + SCORE_CHUNK]))
        for a in range(0, len(images), SCORE_CHUNK)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def summarize(
    cfg: MarbleConfig,
    base_scores: np.ndarray,
    adapter_scores: np.ndarray,
    base_mon: dict[str, np.ndarray],
    adapter_mon: dict[str, np.ndarray],
    jobs: list[dict[str, Any]],
) -> dict[str, Any]:
    """Per-reward statistics, monitors, composite and per-family means (the core of eval.json)."""
    b_boot = {"num_samples": cfg.eval.bootstrap_samples, "seed": cfg.eval.seed}
    rewards: dict[str, Any] = {}
    for k, spec in enumerate(cfg.rewards):
        b, a = base_scores[:, k], adapter_scores[:, k]  # [N], [N]
        finite_b = b[np.isfinite(b)]
        rewards[spec.name] = {
            "kind": spec.kind,
            "held_out": spec.held_out,
            "base": bootstrap_mean_ci(b, **b_boot).to_dict(),
            "adapter": bootstrap_mean_ci(a, **b_boot).to_dict(),
            "base_std": float(finite_b.std()) if finite_b.size else float("nan"),
            "delta": paired_delta_ci(b, a, **b_boot).to_dict(),
            "win_rate": win_rate(b, a),
        }
    monitors = {}
    for name in base_mon:
        bi = bootstrap_mean_ci(base_mon[name], **b_boot)
        ai = bootstrap_mean_ci(adapter_mon[name], **b_boot)
        monitors[name] = {
            "base": bi.to_dict(),
            "adapter": ai.to_dict(),
            "relative_shift": mon.relative_shift(bi.mean, ai.mean),
        }
    return {
        "rewards": rewards,
        "monitors": monitors,
        "composite": composite(rewards),
        "by_family": by_family(cfg, base_scores, adapter_scores, jobs),
    }


def composite(rewards: dict[str, Any]) -> dict[str, Any]:
    """Mean z-score over rewards of the compared models (base, adapter), population std, as the paper."""
    out: dict[str, Any] = {"models": ["base", "adapter"]}
    for label, names in (
        ("all", list(rewards)),
        ("trained", [n for n, r in rewards.items() if not r["held_out"]]),
    ):
        cols = [n for n in names if math.isfinite(rewards[n]["base"]["mean"])]
        if not cols:
            out[label] = {"base": float("nan"), "adapter": float("nan"), "rewards": []}
            continue
        table = np.array([[rewards[n][m]["mean"] for n in cols] for m in ("base", "adapter")])  # [2, K]
        z = composite_zscores(table)  # [2]
        out[label] = {"base": float(z[0]), "adapter": float(z[1]), "rewards": cols}
    return out


def by_family(cfg: MarbleConfig, base: np.ndarray, adapter: np.ndarray, jobs: list[dict]) -> dict[str, Any]:
    """Reward means per prompt family (a specialist's gain shows on its own family)."""
    fams = np.array([j["family"] for j in jobs])
    out: dict[str, Any] = {}
    for fam in sorted(set(fams.tolist())):
        m = fams == fam
        out[fam] = {"n": int(m.sum())}
        for k, spec in enumerate(cfg.rewards):
            b, a = base[m, k], adapter[m, k]
            if np.isfinite(b).any():
                out[fam][spec.name] = {"base": float(np.nanmean(b)), "adapter": float(np.nanmean(a))}
    return out


def flat_metrics(summary: dict[str, Any]) -> dict[str, float | None]:
    """The numbers DVC tracks (`metrics.json`): slash-namespaced, NaN as null."""
    flat: dict[str, float | None] = {}
    for name, r in summary["rewards"].items():
        flat[f"base/{name}"] = r["base"]["mean"]
        flat[f"adapter/{name}"] = r["adapter"]["mean"]
        flat[f"delta/{name}"] = r["delta"]["mean"]
        flat[f"delta_ci_lo/{name}"] = r["delta"]["ci_lo"]
        flat[f"delta_ci_hi/{name}"] = r["delta"]["ci_hi"]
        flat[f"win_rate/{name}"] = r["win_rate"]
    for name, m in summary["monitors"].items():
        flat[f"monitor/base/{name}"] = m["base"]["mean"]
        flat[f"monitor/adapter/{name}"] = m["adapter"]["mean"]
        flat[f"monitor/shift/{name}"] = m["relative_shift"]
    for label in ("all", "trained"):
        for model in ("base", "adapter"):
            flat[f"composite/{label}/{model}"] = summary["composite"][label][model]
    flat["gate_preview/passed"] = float(summary["gate_preview"]["passed"])
    return {k: (float(v) if v is not None and math.isfinite(float(v)) else None) for k, v in flat.items()}


# ---------------------------------------------------------------------------------------- outputs
def _json(obj: Any) -> str:
    """Strict JSON: NaN/inf become null (JSON has no NaN)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"


def save_images(images: torch.Tensor, out: Path) -> None:
    """[N, 3, H, W] uint8 -> out/0000.png ..."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    arr = images.permute(0, 2, 3, 1).numpy()  # [N, H, W, 3] uint8
    for i, a in enumerate(arr):
        Image.fromarray(a).save(out / f"{i:04d}.png")


def sample_rows(cfg, jobs, base_scores, adapter_scores, base_mon, adapter_mon) -> str:
    """samples.jsonl: one line per image pair with every score (for drill-down and audits)."""
    names = [s.name for s in cfg.rewards]
    lines = []
    for i, j in enumerate(jobs):
        row = {k: j[k] for k in ("index", "seed", "prompt_id", "prompt", "family")}
        row["base"] = dict(zip(names, base_scores[i].tolist(), strict=True))
        row["adapter"] = dict(zip(names, adapter_scores[i].tolist(), strict=True))
        row["monitors_base"] = {m: float(v[i]) for m, v in base_mon.items()}
        row["monitors_adapter"] = {m: float(v[i]) for m, v in adapter_mon.items()}
        lines.append(_json(row).replace("\n", "").replace("  ", "") + "\n")
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
    from marble.eval.report import write_report

    prompts_dir, adapter_dir, out_dir = Path(prompts_dir), Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / ADAPTER_FILE).is_file():
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_FILE}; run `marble train` first or pass --adapter")
    jobs = eval_jobs(cfg, prompts_dir)
    hub = hub or Hub.create(offline=cfg.model.offline)
    lineage = collect_lineage(cfg, prompts_dir, adapter_dir, hub)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info(
        "evaluating %d images (%d prompts) on %s", len(jobs), len({j["prompt_id"] for j in jobs}), device
    )
    base_img, adapter_img, sampling = sample_both(cfg, adapter_dir, jobs, device, hub)
    base_scores, adapter_scores = score_images(cfg, [base_img, adapter_img], jobs, device, hub)  # [N, K] x 2
    base_mon, adapter_mon = monitor_images(base_img), monitor_images(adapter_img)

    summary: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lineage": lineage,
        "sampling": {
            **sampling,
            "use_ema": cfg.eval.use_ema,
            "images_per_prompt": cfg.eval.images_per_prompt,
        },
        "num_prompts": len({j["prompt_id"] for j in jobs}),
        "num_images": len(jobs),
        **summarize(cfg, base_scores, adapter_scores, base_mon, adapter_mon, jobs),
        "adapter_effect": {
            "max_abs_pixel_diff": float((adapter_img.int() - base_img.int()).abs().max()) / 255.0
        },
    }
    if summary["adapter_effect"]["max_abs_pixel_diff"] == 0.0:
        log.warning("the adapter did not change a single pixel: an untrained (zero) adapter?")
    summary["gate_preview"] = evaluate_gate(summary, cfg.eval.gate).to_dict()

    with staged_dir(out_dir) as tmp:
        save_images(base_img, tmp / "images" / "base")
        save_images(adapter_img, tmp / "images" / "adapter")
        atomic_write_text(tmp / "eval.json", _json(summary))
        atomic_write_text(tmp / "metrics.json", _json(flat_metrics(summary)))
        atomic_write_text(
            tmp / "samples.jsonl", sample_rows(cfg, jobs, base_scores, adapter_scores, base_mon, adapter_mon)
        )
        write_report(tmp, summary, jobs, base_img, adapter_img, cfg.eval.grid_prompts, train_dir)
    log.info("evaluation written to %s (gate preview: %s)", out_dir, summary["gate_preview"]["summary"])
    return out_dir / "metrics.json"
