"""`Hub`: where a stage's model weights come from, and the checks they pass before anything loads them.

One `Hub` per run, built from the run's settings and passed to every loader (the base model and every
reward), so models and rewards resolve alike:

1. a reward cache is given (`cache_dir`, written by `marble cache-rewards`): ONLY the cache is used, its
   snapshot verified against the manifest (and the manifest against the sha256 the run recorded, when
   known); a missing entry is a `CacheError` (training must not silently go online, and a local
   directory that happens to be named like a hub id must not shadow the verified snapshot);
2. otherwise `model` naming an existing local directory: used as is (a user's own copy, a tiny model);
3. otherwise the hub id and revision go to `from_pretrained` / `hf_hub_download` (the usual HF cache),
   with `local_files_only=True` when `offline`.

With a model lock (`marble.hub.lock`), the locked revision is the one loaded, and the files are checked
against the lock's sha256 before use, whichever of the three places they come from.

`offline` is an explicit setting (`model.offline`, or `HF_HUB_OFFLINE` in the environment, parsed here
and only here); nothing is switched off through a process-wide side effect.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marble.errors import CacheError, HubError, LockError
from marble.hub.files import file_records, list_files
from marble.hub.lock import LockedModel, ModelLock, check_records
from marble.hub.snapshots import cached_snapshot, original_records
from marble.hub.weights import converted_name, is_pickle

log = logging.getLogger(__name__)

OFFLINE_ENV = "HF_HUB_OFFLINE"
_TRUE = ("1", "on", "yes", "true")  # what huggingface_hub itself accepts


def env_offline() -> bool:
    """True when the environment asks for offline hub access (`HF_HUB_OFFLINE`)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in _TRUE


def _path_like(model: str) -> bool:
    return model.startswith((".", "/", "~"))


@dataclass(frozen=True)
class Hub:
    """Model access for one run: reward cache (optional), offline switch, model lock (optional) and the
    cache manifest's recorded sha256 (optional)."""

    cache_dir: Path | None = None
    offline: bool = False
    lock: ModelLock | None = None
    manifest_sha256: str | None = None
    _checked: set = field(default_factory=set, compare=False, repr=False)

    @classmethod
    def create(cls, *, offline: bool = False, cache_dir=None, lock=None, manifest_sha256=None) -> Hub:
        """A `Hub`, offline when asked by the config or by `HF_HUB_OFFLINE`."""
        return cls(
            cache_dir=Path(cache_dir) if cache_dir else None,
            offline=bool(offline) or env_offline(),
            lock=lock,
            manifest_sha256=manifest_sha256 or None,
        )

    # ---- the lock
    def locked(self, model: str, revision: str | None) -> LockedModel | None:
        """The lock entry of `model` (None without a lock); refuses a model the lock lacks or pins
        at another revision than the config."""
        if self.lock is None:
            return None
        entry = self.lock.entry(model)
        if entry is None:
            raise LockError(
                f"model {model!r} is not in the model lock (config {self.lock.config}); run `marble lock "
                "--config <config>` to add it"
            )
        if revision and entry.revision and revision != entry.revision:
            raise LockError(
                f"model {model!r}: the config pins revision {revision} but the lock has {entry.revision}; "
                "run `marble lock --config <config> --update`"
            )
        return entry

    def _check_once(self, key: tuple, check) -> None:
        if key not in self._checked:
            check()
            self._checked.add(key)

    # ---- locating
    def locate(self, model: str, revision: str | None) -> tuple[str, dict[str, Any]]:
        """`(path_or_hub_id, from_pretrained kwargs)` for `model`; see the module docstring for the order."""
        locked = self.locked(model, revision)
        revision = (locked.revision if locked else None) or revision
        if self.cache_dir is not None:
            path, entry = cached_snapshot(self.cache_dir, model, revision, self.manifest_sha256)
            if locked is not None:
                check = lambda: check_records(  # noqa: E731
                    model, locked, original_records(entry), tuple(entry["allow_patterns"] or ()) or None,
                    f"{path}",
                )  # fmt: skip
                self._check_once(("cache", str(path)), check)
            return str(path), {}
        local = Path(model).expanduser()
        if local.is_dir():
            if locked is not None:
                self._check_once(("dir", str(local)), lambda: _check_dir(model, locked, local))
            return str(local), {}
        if _path_like(model):
            raise HubError(f"model directory {model!r} does not exist")
        if locked is not None:
            return str(self._locked_download(model, locked)), {}
        kwargs: dict[str, Any] = {"revision": revision} if revision else {}
        if self.offline:
            kwargs["local_files_only"] = True  # never wait on network time-outs when offline was asked for
        return model, kwargs

    def _locked_download(self, model: str, locked: LockedModel) -> Path:
        """The locked files of `model` at the locked revision in the HF cache, checked against the lock."""
        from huggingface_hub import snapshot_download

        try:
            path = Path(
                snapshot_download(
                    model, revision=locked.revision, allow_patterns=sorted(locked.files),
                    local_files_only=self.offline,
                )
            )  # fmt: skip
        except Exception as exc:  # offline, 404, auth, network: one actionable message
            raise HubError(
                f"cannot fetch {model!r} at its locked revision {locked.revision}: {exc}. Run `marble "
                "cache-rewards` where the hub is reachable and pass --reward-cache"
            ) from exc
        self._check_once(("hf", str(path)), lambda: _check_dir(model, locked, path, follow_links=True))
        return path

    def file(self, model: str, filename: str, revision: str | None) -> Path:
        """Path of one file of a model repo (a state dict that is not a transformers checkpoint). From a
        reward cache, a torch pickle is served as the safetensors file it was converted to."""
        path_or_id, kwargs = self.locate(model, revision)
        base = Path(path_or_id)
        if base.is_dir():
            name = filename
            if self.cache_dir is not None and is_pickle(filename):
                name = converted_name(filename)
                if not (base / name).is_file():
                    raise CacheError(
                        f"{base}: the cached snapshot of {model!r} holds no safetensors conversion of "
                        f"{filename!r}; rerun `marble cache-rewards` (it converts torch pickles once)"
                    )
            if not (base / name).is_file():
                raise HubError(f"{filename!r} not found in {base} (model {model!r})")
            return base / name
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(path_or_id, filename, **kwargs))
        except Exception as exc:  # hub errors have many types (offline, 404, auth); report them uniformly
            raise HubError(
                f"cannot fetch {filename!r} of {model!r} (revision {revision}): {exc}. Run `marble "
                "cache-rewards` where the hub is reachable and pass --reward-cache, or point the config at "
                "a local directory."
            ) from exc

    def from_pretrained(self, cls, model: str, revision: str | None, what: str, **kwargs):
        """`cls.from_pretrained` on the located weights, turning load failures into a `HubError`."""
        path_or_id, extra = self.locate(model, revision)
        try:
            return cls.from_pretrained(path_or_id, **extra, **kwargs)
        except (OSError, ValueError) as exc:
            raise HubError(f"cannot load {what} from {model!r} (revision {revision}): {exc}") from exc


def _check_dir(model: str, locked: LockedModel, root: Path, follow_links: bool = False) -> None:
    """Check a directory's locked files against the lock (the HF cache links files to its blob store,
    hence `follow_links` there; a user's directory may hold other files, which are ignored)."""
    if follow_links:
        rels = [r for r in sorted(locked.files) if (root / r).is_file()]
    else:
        rels = [r for r in list_files(root) if r in locked.files]
    check_records(model, locked, file_records(root, rels), tuple(locked.files), str(root))
