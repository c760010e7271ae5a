"""Loading reward weights that are not transformers checkpoints, and converting pickles to safetensors.

Third-party reward repos publish torch pickles (`HPS_v2.1_compressed.pt`, `ImageReward.pt`, the aesthetic
head's `.pth`). `torch.load(weights_only=True)` is the only safe way to read them, and only where torch
fixed CVE-2025-32434 (a bypass of `weights_only` that runs code; fixed in torch 2.6.0). So marble:
- refuses to unpickle anything on an older torch (checked when loading, not only at install time);
- converts each pickle to safetensors ONCE, when `marble cache-rewards` snapshots it, and loads only the
  safetensors file from the cache afterwards (the pickle is not kept in the snapshot).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

from marble.errors import HubError
from marble.io import atomic_write_bytes

log = logging.getLogger(__name__)

TORCH_FLOOR = (2, 6)
"""First torch release where `torch.load(weights_only=True)` cannot be made to run code (CVE-2025-32434)."""
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt")
"""Torch pickles marble converts; transformers' own `pytorch_model.bin` is left to transformers (which
refuses it on a torch older than the same floor)."""


def torch_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of a torch version string such as '2.6.0+cpu' (default: the installed torch)."""
    if version is None:
        import torch

        version = torch.__version__
    parts = str(version).split("+")[0].split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def require_safe_torch(path: Path) -> None:
    """Refuse to unpickle `path` on a torch where `weights_only=True` can be bypassed."""
    import torch

    if torch_version() < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise HubError(
            f"{path}: refusing to unpickle with torch {torch.__version__}: torch < {floor} lets a crafted "
            f"checkpoint run code despite weights_only=True (CVE-2025-32434); install torch>={floor}"
        )


def is_pickle(name: str) -> bool:
    return Path(name).suffix in PICKLE_SUFFIXES


def load_pickled_weights(path: Path) -> Any:
    """`torch.load(path, weights_only=True)` after the torch version check; refusals are `HubError`s."""
    import torch

    require_safe_torch(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise HubError(
            f"{path}: not loadable as weights only ({exc}); convert it to safetensors, marble never "
            "unpickles arbitrary objects"
        ) from exc


def load_state_dict_file(path: Path) -> dict:
    """A state dict from `.safetensors`, or from a torch pickle loaded with `weights_only=True`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return load_pickled_weights(path)


def flat_tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
    """The tensors of a (nested) checkpoint dict as `{"a.b": tensor}`; a top-level `state_dict` entry
    (the Lightning / HPS layout) is the state dict itself. Non-tensor values (epoch, names) are dropped."""
    import torch

    if not prefix and isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    out: dict[str, Any] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj.detach().to("cpu").contiguous().clone()  # safetensors refuses shared storage
    elif isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flat_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def converted_name(rel: str) -> str:
    """Where the safetensors conversion of the pickle `rel` goes (`a/b.pt` -> `a/b.safetensors`)."""
    return Path(rel).with_suffix(".safetensors").as_posix()


def convert_to_safetensors(src: Path, dst: Path) -> None:
    """Write the tensors of the torch pickle `src` to `dst` as safetensors (atomically)."""
    from safetensors.torch import save

    tensors = flat_tensors(load_pickled_weights(src))
    if not tensors:
        raise HubError(f"{src}: no tensors in this checkpoint; nothing to convert")
    atomic_write_bytes(dst, save(tensors, metadata={"converted_from": src.name}))
    log.info("converted %s to %s (%d tensors)", src.name, dst.name, len(tensors))
