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


def register_for_branch(
    config: Mapping[str, Any],
    work_root: str,
    adapter,
    evaluation,
    expected: str,
    registration,
    report,
    metrics,
):
    """The body of both gate branches: register the adapter (the alias decided again under the
    registry's lock), then publish the record, the decision and the registry link for the run view."""
    import logging

    from marble import stages
    from marble.config import MarbleConfig
    from marble.registry.promotion import branch_check, registered_alias, registry_link
    from marble.runview import registration_markdown, registration_metrics

    cfg = MarbleConfig.model_validate(config)
    store = Path(work_root) / "registry" if work_root else None
    promotion = stages.Promotion(cfg, Path(adapter.path), Path(evaluation.path), registry_dir=store)
    record = stages.register_adapter(promotion, Path(registration.path))
    alias, link = registered_alias(record), registry_link(cfg, record["version"], store)
    note = branch_check(record, expected)
    if note:
        logging.getLogger("marble.registry").warning("%s", note)
    Path(report.path).write_text(registration_markdown(record, link, alias, note), encoding="utf-8")
    for name, value in registration_metrics(record, alias).items():
        metrics.log_metric(name, value)
    registration.metadata.update(scalar_metadata(record))
    registration.metadata.update({"alias": alias, "registry_link": link})
    return record
