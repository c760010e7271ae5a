"""The model lock: the exact weights a config loads, resolved once and enforced everywhere.

`configs/x.yaml` has its lock beside it, `configs/x.lock.yaml` (written by `marble lock`, committed).
For every model repo the config loads (the base model, every reward model, and each processor,
tokenizer and auxiliary checkpoint they load) it records the revision the repo resolved to and the
size and sha256 of every file taken from it:

```yaml
format: marble-lock/1
config: sd35m-marble.yaml
models:
  openai/clip-vit-large-patch14:
    revision: 32bd64288804d66eefd0ccbe215aa642df71cc41   # the hub commit (null for a mirror or directory)
    source: hub
    used_by: [clipscore, aesthetic]
    patterns: [['*.json', '*.txt', '*.model', '*.safetensors', '*.bin']]   # the files each use takes
    files:
      config.json: {size: 4519, sha256: 9d1b...}
```
A hub commit is immutable, and the file hashes pin weights that came from a mirror or a local directory
(which have no commit). The lock's identity (`ModelLock.sha256`) is the sha256 of its canonical JSON
form, so the same lock has the same hash as a file, as a pipeline parameter or in a manifest.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from marble.errors import LockError
from marble.io import atomic_write_text

LOCK_FORMAT = "marble-lock/1"
HEADER = (
    "# marble model lock: the exact weights this config loads (repo, revision, sha256 of every file).\n"
    "# Written by `marble lock`; commit it beside the config. Do not edit: run `marble lock --update`.\n"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LockedFile(_Strict):
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class LockedModel(_Strict):
    revision: str | None = Field(
        description="Hub commit the repo resolved to; null for a mirror or directory."
    )
    source: str = Field(description="hub, mirror or local.")
    used_by: list[str] = Field(default_factory=list, description="Rewards (or base_model) loading it.")
    patterns: list[list[str] | None] = Field(
        default_factory=list, description="File patterns resolved (one list per use; null = every file)."
    )
    files: dict[str, LockedFile]

    def covers(self, patterns: tuple[str, ...] | None) -> bool:
        """Whether the files of this use (`patterns`) were resolved into the lock."""
        return (list(patterns) if patterns is not None else None) in self.patterns

    def files_matching(self, patterns: tuple[str, ...] | None) -> dict[str, LockedFile]:
        if patterns is None:
            return dict(self.files)
        return {p: f for p, f in self.files.items() if any(fnmatch.fnmatch(p, pat) for pat in patterns)}


class ModelLock(_Strict):
    format: str = LOCK_FORMAT
    config: str | None = Field(None, description="Name of the config file this lock belongs to.")
    models: dict[str, LockedModel] = Field(default_factory=dict)
    unpinned: list[str] = Field(
        default_factory=list,
        description="Rewards whose weights a third-party library downloads itself (easyocr, PaddleOCR): "
        "marble cannot pin them.",
    )

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def entry(self, model: str) -> LockedModel | None:
        return self.models.get(model)


def lock_path_for(config_path: str | Path) -> Path:
    """`configs/x.yaml` -> `configs/x.lock.yaml` (the lock lives beside its config)."""
    p = Path(config_path)
    return p.with_name(f"{p.stem}.lock.yaml")


def lock_from_dict(data: Any, source: str) -> ModelLock:
    """Validate a lock's content (from a file or a pipeline parameter); errors name the source and field."""
    if not isinstance(data, dict):
        raise LockError(f"{source}: a model lock must be a mapping, got {type(data).__name__}")
    if data.get("format") != LOCK_FORMAT:
        raise LockError(f"{source}: format {data.get('format')!r}, expected {LOCK_FORMAT!r}")
    try:
        return ModelLock.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise LockError(f"{source}: invalid model lock: {where}: {first['msg']}") from None


def read_lock(path: str | Path) -> ModelLock:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise LockError(f"{path}: cannot read the model lock ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise LockError(f"{path}: not valid YAML ({exc})") from None
    return lock_from_dict(data, str(path))


def write_lock(path: str | Path, lock: ModelLock) -> Path:
    """Write the lock as YAML (sorted models and files, so a diff shows what changed)."""
    data = lock.to_dict()
    data["models"] = {
        k: {**m, "files": dict(sorted(m["files"].items()))} for k, m in sorted(data["models"].items())
    }
    text = HEADER + yaml.safe_dump(data, sort_keys=False, width=120)
    return atomic_write_text(path, text)


def check_records(model: str, locked: LockedModel, records: list[dict], patterns, where: str) -> None:
    """Refuse files that differ from the lock: every record must be locked with the same sha256, and
    every locked file the artifact's patterns take must be present. Errors name model, file, hashes."""
    seen = set()
    for rec in records:
        want = locked.files.get(rec["path"])
        if want is None:
            raise LockError(
                f"{where}: model {model!r}: file {rec['path']!r} (sha256 {rec['sha256']}) is not in the "
                "lock; run `marble lock --update` if this change is intended"
            )
        if want.sha256 != rec["sha256"]:
            raise LockError(
                f"{where}: model {model!r}: file {rec['path']!r} has sha256 {rec['sha256']} but the lock "
                f"has {want.sha256} (revision {locked.revision}); the weights changed since they were locked"
            )
        seen.add(rec["path"])
    missing = sorted(set(locked.files_matching(patterns)) - seen)
    if missing:
        raise LockError(f"{where}: model {model!r}: locked file {missing[0]!r} is missing")
