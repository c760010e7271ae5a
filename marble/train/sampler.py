"""Which prompts an epoch trains on, and the seeds of every random draw of the trainer.

Every random draw (prompt choice, rollout noise, timestep order, training noise) comes from a
generator seeded by `derive_seed(base_seed, purpose, epoch, global index, ...)`. Nothing depends on
hidden global RNG state, which gives two properties the tests check:
- exact resume: an epoch replayed after a kill draws the same numbers;
- process-count independence: a sample's noise depends on its GLOBAL index, not on which rank made it,
  so 1 process and 2 processes with the same global batch compute the same update.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from marble.data.records import PromptRecord

_PURPOSES = {"prompts": 1, "rollout": 2, "order": 3, "timesteps": 4, "noise": 5}


def derive_seed(base: int, purpose: str, *parts: int) -> int:
    """A 63-bit seed from the run seed, a purpose tag and integer coordinates (numpy SeedSequence)."""
    entropy = [int(base) & 0xFFFFFFFF, _PURPOSES[purpose], *(int(p) for p in parts)]
    lo, hi = (int(x) for x in np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32))
    return ((hi & 0x7FFFFFFF) << 32) | lo


def generator(base: int, purpose: str, *parts: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded by `derive_seed`."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(base, purpose, *parts))
    return g


def stratified_prompts(
    records: Sequence[PromptRecord], num: int, seed: int, epoch: int
) -> list[PromptRecord]:
    """`num` prompts for `epoch`, spread over the families as evenly as the pool allows.

    Families are visited round-robin (in sorted order, starting at an epoch-dependent offset) and
    each family's prompts are drawn without replacement from a seeded shuffle; a family that runs out
    is reshuffled. The result is then shuffled so groups of one family are not adjacent.
    """
    if not records:
        raise ValueError("no training prompts")
    rng = random.Random(derive_seed(seed, "prompts", epoch))
    by_family: dict[str, list[PromptRecord]] = defaultdict(list)
    for rec in records:
        by_family[rec.family].append(rec)
    families = sorted(by_family)
    pools: dict[str, list[PromptRecord]] = {}
    start = rng.randrange(len(families))
    chosen: list[PromptRecord] = []
    for i in range(num):
        fam = families[(start + i) % len(families)]
        if not pools.get(fam):
            pools[fam] = rng.sample(by_family[fam], len(by_family[fam]))
        chosen.append(pools[fam].pop())
    rng.shuffle(chosen)
    return chosen
