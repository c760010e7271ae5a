"""Where a reward's weights come from: a local directory, the verified reward cache, or the hub.

Resolution order for a `model` field (hub id or directory) and its pinned `revision`:
1. `model` is an existing local directory: use it as is (a user's own mirror, or a tiny test model);
2. a `cache_dir` (written by `marble cache-rewards`) is given: use its verified snapshot of
   (model, revision); a missing entry is a `CacheError` (training must not silently go online);
3. otherwise pass the hub id and revision to `from_pretrained` / `hf_hub_download`, which honour
   `HF_HUB_OFFLINE=1` and the usual HF cache.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from marble.errors import RewardError

log = logging.getLogger(__name__)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set now (huggingface_hub reads it only once, at import time)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def resolve_model(model: str, revision: str | None, cache_dir: Path | None) -> tuple[str, dict]:
    """`(path_or_id, from_pretrained kwargs)` for a model; see the module docstring for the order."""
    local = Path(model).expanduser()
    if local.is_dir():
        return str(local), {}
    if cache_dir is not None:
        from marble.rewards.cache import cached_snapshot

        return str(cached_snapshot(Path(cache_dir), model, revision)), {}
    if model.startswith((".", "/", "~")):
        raise RewardError(f"model directory {model!r} does not exist")
    kwargs: dict = {"revision": revision} if revision else {}
    if hub_offline():
        kwargs["local_files_only"] = True  # never wait on network timeouts when offline was asked for
    return model, kwargs


def resolve_file(model: str, filename: str, revision: str | None, cache_dir: Path | None) -> Path:
    """Path of one file of a model repo (a state dict that is not a transformers checkpoint)."""
    path_or_id, kwargs = resolve_model(model, revision, cache_dir)
    base = Path(path_or_id)
    if base.is_dir():
        if not (base / filename).is_file():
            raise RewardError(f"{filename!r} not found in {base} (model {model!r})")
        return base / filename
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(path_or_id, filename, **kwargs))
    except Exception as exc:  # hub errors have many types (offline, 404, auth); report them uniformly
        raise RewardError(
            f"cannot fetch {filename!r} of {model!r} (revision {revision}): {exc}. Run `marble cache-rewards` "
            "where the hub is reachable and pass --reward-cache, or point the config at a local directory."
        ) from exc


def from_pretrained(cls, model: str, revision: str | None, cache_dir: Path | None, what: str, **kwargs):
    """`cls.from_pretrained` on the resolved location, turning load failures into a `RewardError`."""
    path_or_id, extra = resolve_model(model, revision, cache_dir)
    try:
        return cls.from_pretrained(path_or_id, **extra, **kwargs)
    except (OSError, ValueError) as exc:
        raise RewardError(f"cannot load {what} from {model!r} (revision {revision}): {exc}") from exc


def load_state_dict_file(path: Path) -> dict:
    """A state dict from `.safetensors`, or from a torch file loaded with `weights_only=True`.

    Never a plain pickle load: a reward checkpoint from the internet must not be able to run code.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise RewardError(
            f"{path}: not loadable as weights only ({exc}); convert it to safetensors, marble never "
            "unpickles arbitrary objects"
        ) from exc
