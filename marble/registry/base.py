"""The `Registry` protocol every backend implements, and the names marble uses inside a registry.

A registry holds versions of one registered model (`registry.model_name`). Each version carries the
adapter files (or a URI to them), string tags (metrics and lineage), and may be pointed to by aliases
(`champion`, `candidate`). Backends: `mlflow_backend.MlflowRegistry` (embedded sqlite or a tracking
server) and `kubeflow_backend.KubeflowModelRegistry` (Kubeflow Model Registry).
"""

from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

CHAMPION = "champion"
"""Alias of the promoted adapter: moved only when the gate passes."""
CANDIDATE = "candidate"
"""Alias of the latest adapter that was registered but failed the gate."""

TAG_KEY = "marble.key"
"""Idempotency key of a version: '<adapter sha256>:<run id>'."""
TAG_SHA = "marble.adapter_sha256"
TAG_RUN = "marble.run_id"
TAG_GATE = "marble.gate"
"""'passed' or 'failed'."""
TAG_GATE_SUMMARY = "marble.gate_summary"
TAG_APPLIED = "marble.aliases_applied"
"""'true' once the alias decision of this version was applied; a crash before that is redone."""
METRIC_PREFIX = "metric."
"""Version tags `metric.<flat metric key>` hold every number of the evaluation's metrics.json."""


@dataclass
class RegisteredVersion:
    """One version of the registered model, as any backend reports it."""

    name: str
    version: str
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """The `metric.*` tags as numbers (unparseable values are skipped)."""
        out = {}
        for k, v in self.tags.items():
            if k.startswith(METRIC_PREFIX):
                try:
                    out[k[len(METRIC_PREFIX) :]] = float(v)
                except ValueError:
                    continue
        return out

    def reward_means(self) -> dict[str, float]:
        """Per-reward adapter means (`adapter/<reward>` metrics): what the Pareto check compares."""
        return {k.split("/", 1)[1]: v for k, v in self.metrics().items() if k.startswith("adapter/")}


@dataclass(frozen=True)
class NewVersion:
    """What a registration stores: the adapter directory, the idempotency key, tags, metrics and the
    evaluation files kept beside the adapter."""

    adapter_dir: Path
    key: str
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    extra_files: list[Path] = field(default_factory=list)


@runtime_checkable
class Registry(Protocol):
    """What `register_adapter` and `fetch_adapter` need from a model registry."""

    backend: str
    model_name: str

    def lock(self) -> AbstractContextManager[object]:
        """Serialises registrations (a file lock for an embedded store; a no-op for servers)."""
        ...

    def find_versions(self, key: str) -> list[RegisteredVersion]:
        """Versions tagged with idempotency key `key`, oldest first."""
        ...

    def create_version(self, new: NewVersion) -> RegisteredVersion:
        """Store the adapter files and create a new version carrying `new.tags` (plus the key)."""
        ...

    def delete_version(self, version: str) -> None:
        """Remove a version (used to resolve a lost registration race)."""
        ...

    def get_alias(self, alias: str) -> RegisteredVersion | None:
        """The version `alias` points to, or None."""
        ...

    def set_alias(self, alias: str, version: str) -> None: ...

    def set_tags(self, version: str, tags: dict[str, str]) -> None: ...

    def download(self, version: RegisteredVersion, dst: Path) -> Path:
        """Copy the version's adapter files into `dst` (created) and return it."""
        ...


def adapter_sha256(adapter_dir: Path) -> str:
    """sha256 over the adapter directory: every file's relative path and bytes, in sorted order.

    Hidden files are skipped (editor and lock droppings must not change the identity).
    """
    adapter_dir = Path(adapter_dir)
    h = hashlib.sha256()
    files = sorted(p for p in adapter_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    for p in files:
        h.update(p.relative_to(adapter_dir).as_posix().encode() + b"\0")
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()
