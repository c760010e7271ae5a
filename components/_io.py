"""Small helpers the component bodies import at run time (inside the task, not at compile time)."""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def flatten_metrics(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of a nested JSON mapping as `{"a/b/c": value}` (booleans as 0/1).

    Kubeflow's Metrics artifact holds flat scalar metrics; lists, strings and non-finite numbers are
    left out (they stay in the metrics.json file the stage wrote).
    """
    flat: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, int | float) and math.isfinite(value):  # bool is an int: 0/1
            flat[name] = float(value)
    return flat


def publish_dir(src: str | Path, dst: str | Path) -> Path:
    """Copy a stage's output directory to an output artifact path (replacing what is there)."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        return dst
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def scalar_metadata(record: Mapping[str, Any]) -> dict[str, str | int | float | bool]:
    """The scalar fields of a record, for an artifact's metadata (shown in the Kubeflow UI)."""
    return {k: v for k, v in record.items() if isinstance(v, str | int | float | bool)}
