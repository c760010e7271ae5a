"""The training recipe: `setup` / `train` / `cleanup` wiring marble's library pieces (docs/algorithm.md §2-§6).

Per epoch: rollouts of the old adapter -> trained rewards `[N, K]` -> per-reward advantages -> for each
optimizer step, `gradient_accumulation_steps` micro-batches x `num_train_timesteps` micro-steps of the
balanced NFT update (one backward each) -> clip, AdamW, evaluation EMA -> old-policy blend -> checkpoint.

Outputs in `out_dir`: `adapter/` (the weights evaluation uses: the EMA when `train.export_ema`),
`adapter-raw/` (the trainable weights), `checkpoints/`, `metrics.jsonl`, `curves.csv`, `alpha.csv`,
`tensorboard/`, `train_summary.json`. Multi-process (accelerate launch): gradients and Grams are averaged
over ranks by hand (the model is not DDP-wrapped, because the trainer switches peft adapters between
forwards); each rank samples distinct whole prompt groups.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from marble.config import MarbleConfig
from marble.errors import InternalError, TrainingError
from marble.hub import Hub
from marble.io import atomic_write_text
from marble.models import loading, lora, text
from marble.models.sampling import predict_velocity, sigma_grid
from marble.train import stepping
from marble.train.checkpoint import Checkpoint, CheckpointManager, restore_rng
from marble.train.ema import EvalEMA
from marble.train.metrics import MetricsLogger, ProgressBar
from marble.train.rollout import EpochBuffer, RolloutWorker, advantage_targets
from marble.train.sampler import stratified_prompts
from marble.train.signals import StopRequest

log = logging.getLogger(__name__)


class TrainingInterrupted(TrainingError):
    """SIGTERM arrived: a checkpoint was written; run the same command again to resume."""


def run_training(cfg: MarbleConfig, prompts_dir: Path, out_dir: Path, hub: Hub | None = None) -> Path:
    """Train a LoRA adapter; returns the exported adapter directory (`out_dir/adapter`). `hub`: the run's
    model access (reward cache, offline, model lock), see `marble.hub`."""
    trainer = Trainer(cfg, Path(prompts_dir), Path(out_dir), hub=hub)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()


class Trainer:
    """MARBLE / DiffusionNFT training of one LoRA adapter. See the module docstring."""

    def __init__(self, cfg: MarbleConfig, prompts_dir: Path, out_dir: Path, hub: Hub | None = None):
        self.cfg = cfg
        self.prompts_dir = prompts_dir
        self.out_dir = out_dir
        self.hub = hub or Hub.create(offline=cfg.model.offline)
        self.step = 0  # optimizer steps done (including skipped ones)
        self.epoch = 0  # current epoch
        self.batch_pos = 0  # next global micro-batch of the current epoch
        self.counters = {"skipped_steps": 0, "consecutive_skips": 0, "diag_batches": 0}
        self.counters.update({f"diag_min_neg_{d}": 0 for d in stepping.DIAG_DIRECTIONS})
        self.buffer: EpochBuffer | None = None
        self.logger: MetricsLogger | None = None
        self.bar: ProgressBar | None = None
        self.stop = StopRequest()

    # =============================================================================== setup
    def setup(self) -> None:
        self._setup_accelerator()
        self._setup_data()
        self._setup_model()
        self._setup_rewards()
        self._setup_optimizer()
        self._setup_checkpoints()
        self._setup_logging()
        self.stop.__enter__()

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator

        t = self.cfg.train
        self.T = self.cfg.num_train_timesteps
        self.accelerator = Accelerator(
            mixed_precision=t.mixed_precision,
            gradient_accumulation_steps=t.gradient_accumulation_steps * self.T,
        )
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self.device = acc.device
        self.is_main = acc.is_main_process
        stepping.check_layout(self.cfg, self.world)
        torch.manual_seed(t.seed)
        if self.world > 1:
            self.reduce_mean = lambda x: acc.reduce(x, "mean")
            self.reduce_sum = lambda x: acc.reduce(x, "sum")
        else:
            self.reduce_mean = self.reduce_sum = None

    def _setup_data(self) -> None:
        from marble.data.records import read_prompt_records

        path = self.prompts_dir / "train.jsonl"
        if not self.prompts_dir.exists():
            # Convenience for `marble train` alone: prepare the prompts the way `marble prepare` would.
            from marble.data.prepare import prepare_prompts

            log.info("no prepared prompts at %s: preparing them first", self.prompts_dir)
            if self.is_main:
                prepare_prompts(self.cfg, self.prompts_dir)
            self.accelerator.wait_for_everyone()
        self.records = read_prompt_records(path)
        if not self.records:
            raise TrainingError(f"{path}: no training prompts")

    def _setup_model(self) -> None:
        m = self.cfg.model
        pipe = loading.load_pipeline(m, device=self.device, hub=self.hub)
        self.text_cache = text.TextEmbeddingCache(pipe, m.max_sequence_length)
        unique = sorted({r.prompt for r in self.records})
        for i in range(0, len(unique), self.cfg.sampling.batch_size):  # encode every prompt once ...
            self.text_cache.get(unique[i : i + self.cfg.sampling.batch_size])
        stepping.drop_text_encoders(pipe)  # ... then free the (large) text encoders
        # LoRA's gaussian init draws from torch's global stream. Seeded here, the initial adapter (and
        # every later draw) depends on train.seed alone, not on whether the loader drew from that stream
        # (one that builds or initialises weights may; the tiny build restores it).
        torch.manual_seed(self.cfg.train.seed)
        self.model = lora.add_lora_adapters(pipe.transformer, self.cfg.lora)
        self.vae = pipe.vae
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        res = self.cfg.sampling.resolution
        factor = pipe.vae_scale_factor
        self.latent_shape = (pipe.transformer.config.in_channels, res // factor, res // factor)
        self.grid = sigma_grid(self.cfg.sampling.num_steps, self.cfg.sampling.shift)  # [S]
        self.ema = EvalEMA(lora.adapter_state_dict(self.model, "default"), self.cfg.train.ema_decay)

    def _setup_rewards(self) -> None:
        from marble.rewards import build_rewards, score_all
        from marble.rl.balancers import build_balancer
        from marble.train.update import NFTUpdate

        self.reward_names = self.cfg.trained_reward_names  # held-out rewards are never trained on
        self.rewards = build_rewards(self.cfg.trained_rewards)
        for r in self.rewards:
            r.setup(self.device, self.hub)
        self.balancer = build_balancer(self.cfg.balancer, self.reward_names, self.T)
        self.worker = RolloutWorker(
            transformer=self.model, vae=self.vae, text_cache=self.text_cache,
            rewards=self.rewards, score_all=score_all, sampling=self.cfg.sampling,
            latent_shape=self.latent_shape, seed=self.cfg.train.seed, device=self.device,
            autocast=self.accelerator.autocast,
        )  # fmt: skip
        n = self.cfg.nft
        self.update = NFTUpdate(
            self.model, self.params, self.balancer, predict_velocity=predict_velocity,
            beta=n.beta, weight_floor=n.weight_floor, kl_weight=n.kl_weight, kl_every=n.kl_every,
            micro_steps_per_step=self.cfg.train.gradient_accumulation_steps * self.T, world_size=self.world,
            reduce_mean=self.reduce_mean, reduce_sum=self.reduce_sum, autocast=self.accelerator.autocast,
        )  # fmt: skip

    def _setup_optimizer(self) -> None:
        t = self.cfg.train
        opt = torch.optim.AdamW(self.params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
        # Constant learning rate [NFT]; a scheduler object keeps the checkpoint format general.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        self.optimizer = self.accelerator.prepare(opt)

    def _setup_checkpoints(self) -> None:
        self.ckpt = CheckpointManager(
            self.out_dir / "checkpoints",
            keep_last=self.cfg.train.keep_last,
            compat=stepping.compat_fields(self.cfg, self.balancer.objective_names),
            rank=self.rank,
            world_size=self.world,
            barrier=self.accelerator.wait_for_everyone,
        )
        path = self.ckpt.resolve(self.cfg.train.resume)
        self.resumed_from = None
        if path is None:
            self.ckpt.check_fresh_start()
        else:
            self._restore(self.ckpt.load(path))
            self.resumed_from = path

    def _setup_logging(self) -> None:
        names = self.reward_names
        curve_keys = [f"train/reward/{k}" for k in names] + ["loss/policy", "loss/kl", "train/grad_norm"]
        alpha_keys = [f"balance/alpha/{k}" for k in self.balancer.objective_names]
        self.logger = MetricsLogger(
            self.out_dir, enabled=self.is_main, tensorboard=self.cfg.train.tensorboard,
            curve_keys=curve_keys, alpha_keys=alpha_keys,
            resume_step=self.step if self.resumed_from is not None else None,
        )  # fmt: skip
        total = self.cfg.train.epochs * stepping.steps_per_epoch(self.cfg, self.world)
        self.bar = ProgressBar(
            total,
            self.step,
            self.is_main and self.cfg.train.progress_bar,
            names,
            self.balancer.objective_names,
        )
        if self.is_main:
            atomic_write_text(
                self.out_dir / "config.json", json.dumps(self.cfg.model_dump(mode="json"), indent=2)
            )

    # =============================================================================== state
    def _capture(self) -> Checkpoint:
        state = {"step": self.step, "epoch": self.epoch, "batch_pos": self.batch_pos,
                 "ema_updates": self.ema.num_updates, **self.counters}  # fmt: skip
        objects: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "nonfinite_rewards": dict(self.worker.nonfinite),
            "out_of_range_rewards": dict(self.worker.out_of_range),
        }
        if self.batch_pos > 0 and self.buffer is not None:  # mid-epoch (SIGTERM): keep the rollouts
            objects["buffer"] = self.buffer.state_dict()
        adapters = {
            "trainable": lora.adapter_state_dict(self.model, "default"),
            "old": lora.adapter_state_dict(self.model, "old"),
            "ema": self.ema.state_dict(),
        }
        # Each rank also records its own balancer state: the multi-process test checks they agree.
        return Checkpoint(
            state=state, adapters=adapters, objects=objects, rank_extra={"balancer": objects["balancer"]}
        )

    def _restore(self, ck: Checkpoint) -> None:
        lora.load_adapter_state_dict(self.model, "default", ck.adapters["trainable"])
        lora.load_adapter_state_dict(self.model, "old", ck.adapters["old"])
        self.ema.load_state_dict(ck.adapters["ema"], int(ck.state["ema_updates"]))
        self.optimizer.load_state_dict(ck.objects["optimizer"])
        self.scheduler.load_state_dict(ck.objects["scheduler"])
        self.balancer.load_state_dict(ck.objects["balancer"])
        self.worker.nonfinite.update(ck.objects.get("nonfinite_rewards", {}))
        self.worker.out_of_range.update(ck.objects.get("out_of_range_rewards", {}))
        self.step, self.epoch, self.batch_pos = (int(ck.state[k]) for k in ("step", "epoch", "batch_pos"))
        self.counters.update({k: int(ck.state.get(k, 0)) for k in self.counters})
        if self.batch_pos > 0:
            self.buffer = EpochBuffer.from_state_dict(ck.objects["buffer"])
        if ck.rng is not None:
            restore_rng(ck.rng)
        log.info(
            "resumed from %s (step %d, epoch %d, micro-batch %d)",
            ck.path,
            self.step,
            self.epoch,
            self.batch_pos,
        )

    def _save(self) -> Path:
        return self.ckpt.save(self._capture())

    # =============================================================================== train
    def train(self) -> Path:
        t = self.cfg.train
        t0 = time.perf_counter()
        while self.epoch < t.epochs:
            if self.batch_pos == 0:
                self.buffer = self.rollout(self.epoch)
            if not self.train_epoch(self.buffer):
                self._interrupted(self._save())
            self.blend_old_policy()
            self.epoch, self.batch_pos, self.buffer = self.epoch + 1, 0, None
            last = self.epoch == t.epochs
            stop = self._stop_requested()
            if last or self.epoch % t.checkpoint_every == 0 or stop:
                path = self._save()
                self.logger.write_plots()
                if stop and not last:
                    self._interrupted(path)
        return self._finish(time.perf_counter() - t0)

    def _stop_requested(self) -> bool:
        """SIGTERM seen by ANY rank (all ranks must stop at the same step, or they deadlock)."""
        flag = torch.tensor([float(self.stop.requested)], device=self.device)
        if self.world > 1:
            flag = self.accelerator.reduce(flag, "sum")
        return bool(flag.item() > 0)

    def _interrupted(self, path: Path) -> None:
        self.logger.write_plots()
        raise TrainingInterrupted(
            f"stopped by signal at step {self.step} (epoch {self.epoch}); checkpoint {path}; "
            "run the same command again to resume"
        )

    # ---- the public steps of one epoch (`train` runs them in order; the benchmarks call them one by one)
    def rollout(self, epoch: int) -> EpochBuffer:
        """Sample this rank's prompt groups, score them, gather, compute advantages (all ranks)."""
        s = self.cfg.sampling
        prompts = stratified_prompts(self.records, s.prompts_per_epoch, self.cfg.train.seed, epoch)
        per_rank = s.prompts_per_epoch // self.world
        mine = prompts[self.rank * per_rank : (self.rank + 1) * per_rank]
        t0 = time.perf_counter()
        latents = self.worker.sample(mine, epoch, first_group=self.rank * per_rank)  # [n, C, h, w]
        rollout_s = time.perf_counter() - t0
        rewards, reward_s = self.worker.score(latents, mine)  # [n, K]
        if self.world > 1:  # every rank gets the whole epoch (global order = rank order)
            latents = self.accelerator.gather(latents.to(self.device).contiguous())
            rewards = self.accelerator.gather(rewards.to(self.device).contiguous())
        latents, rewards = latents.cpu(), rewards.cpu().to(torch.float64)  # [N, ...], [N, K]
        r, mask, r_raw, mask_raw, st = advantage_targets(
            rewards,
            s.group_size,
            self.balancer.objective_advantages,
            self.cfg.nft.std_mode,
            self.cfg.nft.adv_clip_max,
        )
        stats = stepping.reward_metrics(
            self.reward_names, st, self.worker.nonfinite, self.worker.out_of_range
        )
        stats.update({"time/rollout_s": rollout_s, "time/reward_s": reward_s, "epoch": epoch})
        return EpochBuffer(epoch, prompts, s.group_size, latents, rewards, r, mask, r_raw, mask_raw, stats)

    def train_epoch(self, buf: EpochBuffer) -> bool:
        """Optimizer steps over the epoch buffer from `batch_pos`; False if a stop was requested."""
        plan = stepping.EpochPlan(self.cfg, buf, self.world, self.rank, self.grid)
        accum = self.cfg.train.gradient_accumulation_steps
        while self.batch_pos < plan.num_batches:
            if self._stop_requested():
                return False
            metrics = self.optimizer_step(plan, range(self.batch_pos, self.batch_pos + accum))
            self.batch_pos += accum
            self._log(metrics, buf, end_of_epoch=self.batch_pos >= plan.num_batches)
        return True

    def optimizer_step(self, plan: stepping.EpochPlan, batches: range) -> dict[str, float]:
        """One optimizer step over the global micro-batches `batches` of `plan`, each over every trained
        timestep: balanced NFT micro-steps, gradient sync and clip, AdamW, evaluation EMA. A step with a
        non-finite loss or gradient is skipped (the balancer state restored). Returns the step's metrics."""
        t0 = time.perf_counter()
        snapshot = copy.deepcopy(self.balancer.state_dict())  # restored if the step is skipped
        acc = stepping.StepAccumulator()
        for bi, b in enumerate(batches):
            for j in range(self.T):
                micro = bi * self.T + j
                mb = plan.micro_batch(b, j, self.text_cache, self.device)
                if micro == 0 and stepping.diagnostics_due(self.cfg, self.step):
                    acc.add_diagnostics(self.update.diagnose(mb, stepping.direction_cosines()))
                with self.accelerator.accumulate(self.model):
                    res = self.update.micro_step(mb, self.step, micro)
                    if res.loss is not None:
                        self.accelerator.backward(res.loss)
                    if res.policy_grads is not None:  # formed without a backward of its own (per_sample)
                        stepping.add_grads(res.policy_grads, 1 / self.accelerator.gradient_accumulation_steps)
                acc.add(res)
        end = self.update.end_step(self.step)
        if end.policy_grads is not None:  # a balancer that solves on the step (marble_step)
            stepping.add_grads(end.policy_grads, 1 / self.accelerator.gradient_accumulation_steps)
        acc.add_step_end(end)
        if not self.accelerator.sync_gradients:
            raise InternalError("accelerate's gradient-accumulation boundary does not match the step plan")
        grad_norm = stepping.sync_and_clip(
            self.accelerator, self.params, self.cfg.train.max_grad_norm, self.world
        )
        finite = math.isfinite(grad_norm) and acc.finite
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            self.ema.update(lora.adapter_state_dict(self.model, "default"))
            self.counters["consecutive_skips"] = 0
        else:
            self.balancer.load_state_dict(snapshot)
            self.counters["skipped_steps"] += 1
            self.counters["consecutive_skips"] += 1
            log.warning("step %d: non-finite loss or gradient; optimizer step skipped", self.step)
        self.optimizer.zero_grad(set_to_none=True)
        metrics = acc.metrics(self.balancer, self.counters)
        metrics.update({"train/grad_norm": grad_norm, "time/train_s": time.perf_counter() - t0})
        self.step += 1
        if self.counters["consecutive_skips"] >= self.cfg.train.max_consecutive_skips:
            raise TrainingError(
                f"{self.counters['consecutive_skips']} consecutive optimizer steps had a non-finite loss or "
                f"gradient (train.max_consecutive_skips={self.cfg.train.max_consecutive_skips}); last at step "
                f"{self.step - 1}. Lower train.lr or check the rewards (metrics.jsonl)"
            )
        return metrics

    def blend_old_policy(self) -> float:
        """After an epoch, θ_old ← η θ_old + (1 - η) θ (docs/algorithm.md §5); returns η."""
        eta = stepping.old_policy_eta(self.cfg.nft, self.step)
        lora.blend_old_adapter(self.model, eta)
        return eta

    def set_balancer(self, balancer: Any) -> None:
        """Use another balancer from the next micro-step on (the recipe never branches on its kind)."""
        self.balancer = balancer
        self.update.balancer = balancer

    def _log(self, metrics: dict[str, float], buf: EpochBuffer, end_of_epoch: bool = False) -> None:
        metrics = {**buf.stats, **metrics, **stepping.peak_memory(self.device)}
        metrics["train/old_eta"] = stepping.old_policy_eta(self.cfg.nft, self.step)
        metrics["train/lr"] = self.scheduler.get_last_lr()[0]
        if self.step % self.cfg.train.log_every == 0 or end_of_epoch:
            self.logger.log(self.step, metrics)
        self.bar.update(self.step, metrics)

    def _finish(self, seconds: float) -> Path:
        """Export the adapters and write the run summary (main process)."""
        adapter = self.out_dir / "adapter"
        if self.is_main:
            ema_sd = self.ema.state_dict()
            use = ema_sd if self.cfg.train.export_ema else None
            lora.export_adapter(self.model, adapter, "default", state_dict=use)
            lora.export_adapter(self.model, self.out_dir / "adapter-raw", "default")
            summary = stepping.summary(self.logger.records, self.reward_names, self.balancer.objective_names)
            summary.update({"steps": self.step, "epochs": self.epoch, "train_seconds": seconds,
                            "adapter": str(adapter), "adapter_weights": "ema" if self.cfg.train.export_ema else "trainable",
                            "config_hash": self.cfg.config_hash(), **self.counters,
                            "model_lock_sha256": self.hub.lock.sha256 if self.hub.lock else None,
                            "reward_cache_manifest_sha256": self.hub.manifest_sha256})  # fmt: skip
            atomic_write_text(self.out_dir / "train_summary.json", json.dumps(summary, indent=2))
        self.accelerator.wait_for_everyone()
        return adapter

    # =============================================================================== cleanup
    def cleanup(self) -> None:
        self.stop.__exit__(None, None, None)
        if self.bar is not None:
            self.bar.close()
        if self.logger is not None:
            self.logger.close()
