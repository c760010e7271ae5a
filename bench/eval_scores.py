"""Per-image evaluation scores of the reward study, kept beside its runs for later readings.

`bench.reward_balance` scores every image it evaluates (the base model's and each adapter's, on the
held-out and the training prompts) and writes the scores here, so a reading per prompt
(`bench.prompt_level`) needs no second evaluation. One `.npz` of numeric and string arrays only (it
loads with `allow_pickle=False`):
- `rewards`: the K reward names (the columns);
- `<split>/prompt_ids`, `<split>/prompts`: each image's prompt id and text, in image order;
- `<split>/base`: `[N, K]` the base model's scores;
- `<split>/<preset>-seed<seed>`: `[N, K]` that run's adapter's scores (NaN: the reward does not score
  the image).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from marble.io import atomic_write_bytes

SCORES_FILE = "eval_scores.npz"  # in the reward study's runs directory


@dataclass
class SplitScores:
    """One split's evaluation: the images' prompts, the base scores and each run's."""

    prompt_ids: list[str]
    prompts: list[str]
    base: np.ndarray  # [N, K]
    runs: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # (preset, seed) -> [N, K]


def run_key(preset: str, seed: int) -> str:
    return f"{preset}-seed{seed}"


def save(path: Path, rewards: list[str], splits: dict[str, SplitScores]) -> Path:
    """Write `splits` (refusing arrays whose shape is not [images, rewards]) atomically."""
    arrays: dict[str, np.ndarray] = {"rewards": np.asarray(rewards, dtype=str)}
    for split, s in splits.items():
        shape = (len(s.prompt_ids), len(rewards))
        if len(s.prompts) != shape[0]:
            raise ValueError(f"{path}: {split}: {len(s.prompts)} prompts for {shape[0]} prompt ids")
        for key, a in {"base": s.base, **{run_key(*r): a for r, a in s.runs.items()}}.items():
            if np.shape(a) != shape:
                raise ValueError(f"{path}: {split}/{key}: shape {np.shape(a)}, expected {shape}")
            arrays[f"{split}/{key}"] = np.asarray(a, dtype=np.float64)
        arrays[f"{split}/prompt_ids"] = np.asarray(s.prompt_ids, dtype=str)
        arrays[f"{split}/prompts"] = np.asarray(s.prompts, dtype=str)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def load(path: Path) -> tuple[list[str], dict[str, SplitScores]]:
    """(reward names, split -> scores) as `save` wrote them."""
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    if "rewards" not in data:
        raise ValueError(f"{path}: no 'rewards' array: not a reward study's scores file")
    splits: dict[str, SplitScores] = {}
    for key in sorted(k for k in data if k.endswith("/base")):
        split = key.removesuffix("/base")
        runs = {}
        for k, a in data.items():
            head, _, name = k.partition("/")
            if head != split or name in ("base", "prompt_ids", "prompts"):
                continue
            preset, sep, seed = name.rpartition("-seed")
            if not sep or not seed.isdigit():
                raise ValueError(f"{path}: array {k!r} is not <split>/<preset>-seed<seed>")
            runs[(preset, int(seed))] = a
        splits[split] = SplitScores(
            [str(x) for x in data[f"{split}/prompt_ids"]],
            [str(x) for x in data[f"{split}/prompts"]],
            data[key],
            runs,
        )
    return [str(x) for x in data["rewards"]], splits
