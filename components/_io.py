"""Small helpers the component bodies import at run time (inside the task, not at compile time)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any


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
