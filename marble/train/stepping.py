"""Small helpers of the trainer: epoch plan (which samples, timesteps and noise each micro-step sees),
per-step metric accumulation, gradient sync + clip, layout checks, compatibility fields, summaries.

Kept out of `trainer.py` so the recipe stays a readable table of contents.
"""

from __future__ import annotations

import gc
import math
import resource
import sys
from typing import Any

import torch
from torch import Tensor

from marble.config import MarbleConfig
from marble.errors import TrainingError
from marble.rl.nft import reward_weights
from marble.train.rollout import EpochBuffer
from marble.train.sampler import generator
from marble.train.update import MicroBatch, MicroStepResult

DIAG_DIRECTIONS = ("applied", "fresh", "equal_sum")


# ---------------------------------------------------------------------------------------- layout
def check_layout(cfg: MarbleConfig, world: int) -> None:
    """Refuse a process count that cannot split the epoch into whole prompt groups and micro-batches."""
    s, t = cfg.sampling, cfg.train
    if s.prompts_per_epoch % world:
        raise TrainingError(
            f"sampling.prompts_per_epoch={s.prompts_per_epoch} must be divisible by the number of "
            f"processes ({world}): each process samples whole prompt groups"
        )
    global_mb = t.micro_batch_size * world
    if s.samples_per_epoch % global_mb:
        raise TrainingError(
            f"train.micro_batch_size={t.micro_batch_size} x {world} processes must divide the epoch's "
            f"{s.samples_per_epoch} samples"
        )
    if (s.samples_per_epoch // global_mb) % t.gradient_accumulation_steps:
        raise TrainingError(
            f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} must divide the "
            f"{s.samples_per_epoch // global_mb} global micro-batches per epoch ({world} processes)"
        )


def steps_per_epoch(cfg: MarbleConfig, world: int) -> int:
    return (
        cfg.sampling.samples_per_epoch
        // (cfg.train.micro_batch_size * world)
        // cfg.train.gradient_accumulation_steps
    )


def compat_fields(cfg: MarbleConfig, objective_names: list[str]) -> dict[str, Any]:
    """Config fields a checkpoint must agree with to be resumed (its tensors would not fit otherwise)."""
    return {
        "model.pretrained": cfg.model.pretrained,
        "model.revision": cfg.model.revision,
        "model.tiny": None
        if cfg.model.tiny is None or not cfg.model.is_tiny
        else cfg.model.tiny.model_dump(mode="json"),
        "lora.rank": cfg.lora.rank,
        "lora.alpha": cfg.lora.alpha,
        "lora.target_modules": list(cfg.lora.target_modules),
        "rewards": cfg.trained_reward_names,
        "balancer.objectives": list(objective_names),
    }


def drop_text_encoders(pipe: Any) -> None:
    """Free the text encoders once every training prompt is in the embedding cache (SD3.5's T5 is ~9 GB)."""
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            setattr(pipe, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------- plan
class EpochPlan:
    """The deterministic schedule of one epoch's update phase.

    Global micro-batch b holds samples `order[b*Mg:(b+1)*Mg]` (Mg = micro_batch_size x world); rank r
    trains rows `[r*M, (r+1)*M)` of it. Each sample i gets its own random permutation of the sampling
    grid (the first `num_train_timesteps` are trained, one per micro-step, docs/algorithm.md §5) and fresh
    noise per timestep, all seeded by (seed, epoch, i[, j]) so nothing depends on the rank layout.
    """

    def __init__(self, cfg: MarbleConfig, buf: EpochBuffer, world: int, rank: int, grid: Tensor) -> None:
        seed, n = cfg.train.seed, buf.num_samples
        self.buf = buf
        self.cfg = cfg
        self.M = cfg.train.micro_batch_size
        self.Mg = self.M * world
        self.world, self.rank = world, rank
        self.grid = grid.detach().float().cpu()  # [S]
        self.num_batches = n // self.Mg
        self.order = torch.randperm(n, generator=generator(seed, "order", buf.epoch))  # [N]
        S = self.grid.shape[0]
        self.perms = torch.stack(
            [torch.randperm(S, generator=generator(seed, "timesteps", buf.epoch, i)) for i in range(n)]
        )  # [N, S]

    def _rows(self, b: int) -> tuple[Tensor, slice]:
        idx_g = self.order[b * self.Mg : (b + 1) * self.Mg]  # [Mg]
        return idx_g, slice(self.rank * self.M, (self.rank + 1) * self.M)

    def micro_batch(self, b: int, j: int, text_cache: Any, device: torch.device) -> MicroBatch:
        """Micro-batch b at timestep slot j, on `device`."""
        buf, C = self.buf, self.cfg.nft.adv_clip_max
        idx_g, mine = self._rows(b)
        idx = idx_g[mine]  # [M]
        # weights normalised over the GLOBAL micro-batch, x world (gradients are averaged over ranks)
        c = reward_weights(buf.mask[idx_g], C)[mine] * self.world  # [M, K']
        c_raw = reward_weights(buf.mask_raw[idx_g], C)[mine] * self.world  # [M, K]
        x0 = buf.latents[idx]  # [M, C, h, w]
        noise = torch.stack(
            [
                torch.randn(
                    x0.shape[1:], generator=generator(self.cfg.train.seed, "noise", buf.epoch, int(i), j)
                )
                for i in idx
            ]
        )  # [M, C, h, w]
        t = self.grid[self.perms[idx, j]]  # [M]
        emb = text_cache.get([buf.prompts[int(i) // buf.group_size].prompt for i in idx])
        if hasattr(emb, "to"):
            emb = emb.to(device)
        return MicroBatch(
            x0=x0.to(device), emb=emb, t=t.to(device), noise=noise.to(device, x0.dtype),
            r=buf.r[idx].to(device), c=c.to(device), r_raw=buf.r_raw[idx].to(device), c_raw=c_raw.to(device),
        )  # fmt: skip


def old_policy_eta(nft: Any, step: int) -> float:
    """η of the old-policy blend after `step` optimizer steps: min(rate · step, cap) [NFT; docs/algorithm.md §5]."""
    return min(nft.old_decay_rate * step, nft.old_decay_cap)


def diagnostics_due(cfg: MarbleConfig, step: int) -> bool:
    every = cfg.train.diagnostics_every
    return every > 0 and step % every == 0


def direction_cosines():
    from marble.rl.diagnostics import direction_cosines as fn

    return fn


# ---------------------------------------------------------------------------------------- step
class StepAccumulator:
    """Collects one optimizer step's micro-step results into metrics."""

    def __init__(self) -> None:
        self.policy = 0.0
        self.kl = 0.0
        self.kl_n = 0  # micro-steps that estimated the KL (all, or one per step: nft.kl_every)
        self.n = 0
        self.finite = True
        self.refresh: Any | None = None
        self.observed = 0
        self.balance_s = 0.0
        self.applied: list[Any] = []
        self.cos: list[Tensor] = []
        self.cos_space = "output"
        self.diag: dict[str, float] = {}

    def add(self, res: MicroStepResult) -> None:
        self.policy += res.policy
        if res.kl is not None:
            self.kl += res.kl
            self.kl_n += 1
        self.n += 1
        self.finite = self.finite and math.isfinite(res.policy) and math.isfinite(self.kl)
        self.balance_s += res.balance_s
        if res.balance is not None:
            self.refresh = res.balance
            self.observed += 1
        if res.applied is not None:
            self.applied.append(res.applied)
        if res.cos is not None:
            self.cos.append(res.cos)
            self.cos_space = res.cos_space

    def add_step_end(self, end: Any) -> None:
        """What the end of the step added (`update.StepEnd`): the refresh the balancer committed
        (step-accumulated), if any, and for a step solve its exact cosines and its time."""
        if end.balance is not None:
            self.refresh = end.balance
        if end.cos is not None:
            self.cos.append(end.cos)
            self.cos_space = "params"
        self.balance_s += end.balance_s

    def add_diagnostics(self, diag: dict[str, float]) -> None:
        self.diag = diag

    def metrics(self, balancer: Any, counters: dict[str, int]) -> dict[str, float]:
        out = {"loss/policy": self.policy / max(self.n, 1), "loss/kl": self.kl / max(self.kl_n, 1)}
        names = balancer.objective_names
        out.update(balancer.current_stats().to_metrics(names))  # α after the step, latest α*, norms
        out["balance/refreshed"] = float(self.refresh is not None)
        out["balance/refresh_micro_steps"] = float(self.observed)
        if self.refresh is not None:
            for key in ("min_norm", "qp_ms"):
                if getattr(self.refresh, key) is not None:
                    out[f"balance/{key}"] = float(getattr(self.refresh, key))
        out.update(applied_metrics(self.applied, names))
        out.update(applied_cosine_metrics(self.cos, names, self.cos_space))
        out["time/balance_s"] = self.balance_s
        out["train/skipped_steps"] = counters["skipped_steps"]
        if self.diag:
            out.update(self.diag)
            counters["diag_batches"] += 1
            for d in DIAG_DIRECTIONS:
                counters[f"diag_min_neg_{d}"] += int(self.diag[f"diag/cos_{d}/min"] < 0)
                out[f"diag/frac_min_neg/{d}"] = counters[f"diag_min_neg_{d}"] / counters["diag_batches"]
        return out


def applied_metrics(applied: list[Any], names: list[str]) -> dict[str, float]:
    """Means over the step's micro-steps of the applied γ, the batches' gradient norms (where the
    balancer reads them) and how often γ was bounded (docs/algorithm.md §6)."""
    if not applied:
        return {}
    out: dict[str, float] = {}
    gamma = torch.stack([a.gamma for a in applied]).to(torch.float64)  # [M, K']
    out.update({f"balance/gamma/{n}": float(g) for n, g in zip(names, gamma.mean(0), strict=True)})
    if applied[0].norms is not None:
        norms = torch.stack([a.norms for a in applied]).to(torch.float64)  # [M, K'] NaN = invalid
        mean = norms.nanmean(0)
        out.update({f"balance/batch_grad_norm/{n}": float(v) for n, v in zip(names, mean, strict=True)})
    if applied[0].capped is not None:
        capped = torch.stack([a.capped for a in applied]).to(torch.float64).mean(0)  # [K']
        out.update({f"balance/gamma_capped/{n}": float(v) for n, v in zip(names, capped, strict=True)})
    return out


def applied_cosine_metrics(
    cosines: list[Tensor], names: list[str], space: str = "output"
) -> dict[str, float]:
    """Alignment of the applied direction every step, free: per micro-step `cos(d, g_k)` from the Gram
    the micro-step had (`diagnostics.gram_cosines`): the batch's output-space Gram (`space="output"`)
    or, with the per_sample Gram source, the exact parameter-space one (`space="params"`); means over
    the step, the mean per-micro-step minimum and the fraction of micro-steps with a reward at an
    obtuse angle."""
    if not cosines:
        return {}
    cos = torch.stack(cosines).to(torch.float64)  # [M, K'] NaN = invalid reward on that micro-step
    out = {f"balance/cos_{space}/{n}": float(v) for n, v in zip(names, cos.nanmean(0), strict=True)}
    ok = torch.isfinite(cos).any(1)  # [M]
    if ok.any():
        mins = torch.where(torch.isfinite(cos), cos, torch.full_like(cos, math.inf)).min(1).values[ok]
        out[f"balance/cos_{space}_min"] = float(mins.mean())
        out[f"balance/cos_{space}_negative_frac"] = float((mins < 0).to(torch.float64).mean())
    return out


def add_grads(pairs: list[tuple[Tensor, Tensor]], scale: float) -> None:
    """`p.grad += scale g` for each (parameter, gradient): a gradient formed outside autograd, scaled as
    accelerate scales a backward's loss under gradient accumulation (1 / accumulation steps)."""
    for p, g in pairs:
        if p.grad is None:
            p.grad = g * scale
        else:
            p.grad.add_(g, alpha=scale)


def sync_and_clip(accelerator: Any, params: list[Tensor], max_norm: float, world: int) -> float:
    """Average gradients over ranks (one flat all-reduce), clip them, return the pre-clip norm."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world > 1:
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # [P]
        flat = accelerator.reduce(flat, "mean")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n
    norm = accelerator.clip_grad_norm_(params, max_norm)
    return float(norm)


# ---------------------------------------------------------------------------------------- metrics
def reward_metrics(
    names: list[str], st: Any, nonfinite: dict[str, int], out_of_range: dict[str, int]
) -> dict[str, float]:
    """Epoch-level reward metrics of docs/algorithm.md §6 from `AdvantageStats` (per trained reward);
    the non-finite and out-of-range counts are cumulative over the run."""
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        out[f"train/reward/{name}"] = float(st.mean[k])
        out[f"train/reward_valid_frac/{name}"] = float(st.valid_frac[k])
        out[f"train/adv_std/{name}"] = float(st.adv_std[k])
        out[f"train/zero_std_groups/{name}"] = float(st.zero_std_groups[k])
        out[f"train/reward_nonfinite/{name}"] = float(nonfinite.get(name, 0))
        out[f"train/reward_out_of_range/{name}"] = float(out_of_range.get(name, 0))
    return out


def peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"mem/peak_gb": torch.cuda.max_memory_allocated(device) / 1e9}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"mem/peak_rss_gb": rss / (1e9 if sys.platform == "darwin" else 1e6)}


def summary(records: list[dict[str, Any]], names: list[str], objectives: list[str]) -> dict[str, Any]:
    """First vs last rewards (mean over a window of steps) and the α trajectory, for train_summary.json."""
    n = len(records)
    w = max(1, min(5, n // 4))
    out: dict[str, Any] = {"window_steps": w, "reward_first": {}, "reward_last": {}}
    for name in names:
        vals = [r.get(f"train/reward/{name}") for r in records]
        vals = [v for v in vals if v is not None]
        if vals:
            out["reward_first"][name] = sum(vals[:w]) / len(vals[:w])
            out["reward_last"][name] = sum(vals[-w:]) / len(vals[-w:])
    out["alpha"] = {o: [r.get(f"balance/alpha/{o}") for r in records] for o in objectives}
    return out
