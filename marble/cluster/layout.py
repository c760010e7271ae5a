"""Which process counts can split a config's epoch: checked before any pod or process starts.

Every process samples whole prompt groups and takes whole micro-batches; the gradient-accumulation
window counts GLOBAL micro-batches (the rules `marble.train.stepping.check_layout` enforces inside the
trainer). Refusing at config time names the counts that work instead of failing inside a job.
"""

from __future__ import annotations

from typing import Any


def layout_problem(cfg: Any, world: int) -> str | None:
    """Why `world` processes cannot split the epoch of `cfg` (a MarbleConfig), or None when they can."""
    s, t = cfg.sampling, cfg.train
    samples = s.group_size * s.prompts_per_epoch
    if s.prompts_per_epoch % world:
        return f"sampling.prompts_per_epoch={s.prompts_per_epoch} is not divisible by {world} processes"
    if samples % (t.micro_batch_size * world):
        return (
            f"train.micro_batch_size={t.micro_batch_size} x {world} processes does not divide the epoch's "
            f"{samples} samples"
        )
    if (samples // (t.micro_batch_size * world)) % t.gradient_accumulation_steps:
        return (
            f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} does not divide the "
            f"{samples // (t.micro_batch_size * world)} global micro-batches per epoch of {world} processes"
        )
    return None


def valid_process_counts(cfg: Any) -> list[int]:
    """Every process count that splits the epoch (all divide sampling.prompts_per_epoch)."""
    n = cfg.sampling.prompts_per_epoch
    return [w for w in range(1, n + 1) if layout_problem(cfg, w) is None]
