"""Hand-made adapters and evaluations for the registry tests (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

from _eval_helpers import reward, scores, summary

from marble.registry.base import adapter_sha256


def make_adapter(root: Path, payload: bytes) -> Path:
    d = root / f"adapter-{payload.hex()[:8]}"
    d.mkdir(parents=True)
    (d / "pytorch_lora_weights.safetensors").write_bytes(payload)
    return d


def make_eval(
    root: Path, adapter: Path, means: dict[str, float], *, improve=True, dark_shift=0.1, protocol="p1"
) -> Path:
    """A hand-made evaluation of `adapter`: trained rewards at `means`, improving significantly or not."""
    d = root / f"eval-{adapter.name}-{improve}-{dark_shift}-{protocol}"
    d.mkdir(parents=True)
    lo = 0.01 if improve else -0.05
    delta = 0.05 if improve else 0.0
    rewards = {
        name: reward(delta, (lo, 0.1), m, held_out=name == "jpeg", base_std=0.1, n=8)
        for name, m in means.items()
    }
    ev = summary(
        scores(rewards, {"dark_fraction": dark_shift}),
        adapter_sha256=adapter_sha256(adapter),
        protocol=protocol,
    )
    ev.write(d / "eval.json")
    (d / "metrics.json").write_text(json.dumps(ev.flat_metrics()))
    return d
