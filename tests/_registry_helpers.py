"""Hand-made adapters and evaluations for the registry tests (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

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
    rewards = {
        name: {
            "held_out": name == "jpeg",
            "base_std": 0.1,
            "base": {"mean": m - (0.05 if improve else 0.0)},
            "adapter": {"mean": m},
            "delta": {"mean": 0.05 if improve else 0.0, "ci_lo": lo, "ci_hi": 0.1, "n": 8},
        }
        for name, m in means.items()
    }
    summary = {
        "lineage": {
            "adapter_sha256": adapter_sha256(adapter),
            "config_hash": "c0ffee",
            "data_hash": "da7a",
            "eval_protocol": protocol,
        },
        "rewards": rewards,
        "monitors": {"dark_fraction": {"relative_shift": dark_shift}},
    }
    (d / "eval.json").write_text(json.dumps(summary))
    metrics = {f"adapter/{k}": v for k, v in means.items()}
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d
