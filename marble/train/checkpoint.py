"""Training checkpoints: atomic directories, verified on load, compatible-or-refused, keep-last-k.

Layout of one checkpoint (`<out>/checkpoints/step-00000040/`):
    adapter-trainable.safetensors   the trainable LoRA weights ("default")
    adapter-old.safetensors         the frozen old-policy adapter
    adapter-ema.safetensors         the evaluation EMA of the trainable weights
    objects.pt                      optimizer, scheduler, balancer state, optional epoch buffer
    rank<r>.pt                      rank r's RNG states (python / numpy / torch) and per-rank extras
    state.json                      step, epoch, data position, counters, compatibility fields
    manifest.json                   sha256 of every file above (written last)

The three adapters are stored SEPARATELY on purpose: an upstream bug resumes from the EMA weights
(docs/algorithm.md §5). A checkpoint is written under a temporary name and renamed, so a directory with a
checkpoint's name is complete; the manifest additionally catches later damage (truncated or edited
files), in which case `resume: latest` warns and falls back to the previous checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from marble.errors import CheckpointError
from marble.io import (
    bytes_sha256,
    ensure_free,
    file_sha256,
    fsync_dir,
    make_staging_dir,
    publish_dir,
    storage_errors,
    torch_bytes,
)

log = logging.getLogger(__name__)

PREFIX = "step-"
TMP_PREFIX = ".tmp-"
ADAPTERS = ("trainable", "old", "ema")
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """What a checkpoint holds, in memory."""

    state: dict[str, Any]  # step, epoch, data position, counters, "compat" fields
    adapters: dict[str, dict[str, torch.Tensor]]  # "trainable" / "old" / "ema" -> state dict
    objects: dict[str, Any] = field(default_factory=dict)  # optimizer, scheduler, balancer, buffer
    rng: dict[str, Any] | None = None  # this rank's RNG states (captured at save time if None)
    rank_extra: dict[str, Any] = field(default_factory=dict)  # per-rank values (e.g. balancer state)
    path: Path | None = None

    @property
    def step(self) -> int:
        return int(self.state["step"])


# ------------------------------------------------------------------------------------------ RNG
def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU and, when present, CUDA) RNG states of this process."""
    out: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_torch(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _numpy_state_to_torch(state: tuple) -> dict[str, Any]:
    """numpy's legacy RNG state with its key array as a tensor, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip


def _numpy_state_from_torch(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"])


def restore_rng(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(_numpy_state_from_torch(states["numpy"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------------------------------------------------------------- helpers
def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; detach to CPU copies.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def checkpoint_step(path: Path) -> int | None:
    """Step encoded in a checkpoint directory name, or None if the name is not one."""
    name = path.name
    if not name.startswith(PREFIX):
        return None
    try:
        return int(name[len(PREFIX) :])
    except ValueError:
        return None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, oldest first (temporary ones are ignored)."""
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if p.is_dir() and (s := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError if `path` is not a complete, undamaged checkpoint.

    Symbolic links are refused (the directory or anything in it): a checkpoint on a shared volume must
    not make the trainer read a file from elsewhere.
    """
    links = [p for p in (path, *path.iterdir()) if p.is_symlink()] if path.is_dir() else []
    if links or path.is_symlink():
        raise CheckpointError(f"{(links or [path])[0]}: a symbolic link in a checkpoint (refused)")
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise CheckpointError(f"{path}: no manifest.json (incomplete checkpoint)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{manifest}: unreadable manifest ({exc})") from None
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: file {name} listed in the manifest is missing")
        if file_sha256(f) != digest:
            raise CheckpointError(f"{f}: sha256 does not match the manifest (file damaged)")


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose compatibility fields (LoRA shape, rewards, base model) differ.

    `saved` / `current` map config field paths (e.g. "lora.rank") to values.
    """
    for key, want in current.items():
        have = saved.get(key, "<missing>")
        if have != want:
            raise CheckpointError(
                f"{path}: checkpoint was trained with {key}={have!r} but the config has {key}={want!r}; "
                "use another output directory or set train.resume=none to start over"
            )


# ---------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Writes, finds, verifies and prunes the checkpoints of one training run.

    In a multi-process run every rank calls `save` (each writes its own RNG file); rank 0 writes the
    shared files, the manifest and does the rename. `barrier` synchronises the ranks (no-op alone).
    """

    def __init__(
        self,
        root: Path,
        *,
        keep_last: int,
        compat: dict[str, Any],
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.compat = compat
        self.rank = rank
        self.world_size = world_size
        self._barrier = barrier or (lambda: None)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- writing
    def save(self, ckpt: Checkpoint) -> Path:
        """Write `ckpt` atomically as `<root>/step-<step>`; returns the final directory.

        Every file is serialised in memory first, so the bytes needed are known: a disk without room is
        refused before writing, and a failed write is a `StorageError` naming them; the temporary
        directory is removed either way.
        """
        final = self.root / f"{PREFIX}{ckpt.step:08d}"
        tmp = self.root / f"{TMP_PREFIX}{final.name}"
        rank_state = {"rng": capture_rng() if ckpt.rng is None else ckpt.rng, "extra": ckpt.rank_extra}
        files = {f"rank{self.rank}.pt": torch_bytes(rank_state)}
        if self.is_main:
            files.update(self._shared_files(ckpt))
            with storage_errors(final, sum(map(len, files.values()))):
                make_staging_dir(final, name=tmp.name)
        self._barrier()
        try:
            self._write(final, tmp, files)
            self._barrier()
            if self.is_main:
                digests = {n: bytes_sha256(b) for n, b in files.items()}
                for p in sorted(tmp.glob("rank*.pt")):  # the other ranks' files
                    digests.setdefault(p.name, file_sha256(p))
                manifest = json.dumps({"files": dict(sorted(digests.items()))}, indent=2).encode()
                self._write(final, tmp, {"manifest.json": manifest})
                with storage_errors(final):
                    publish_dir(tmp, final)
        except BaseException:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.is_main:
            self._prune()
            log.info("checkpoint written: %s", final)
        self._barrier()
        return final

    def _shared_files(self, ckpt: Checkpoint) -> dict[str, bytes]:
        """The files rank 0 writes: the three adapters, the objects and the state (serialised)."""
        files = {
            f"adapter-{name}.safetensors": safetensors_bytes(_contiguous(ckpt.adapters[name]))
            for name in ADAPTERS
        }
        files["objects.pt"] = torch_bytes(ckpt.objects)
        state = {**ckpt.state, "compat": self.compat, "world_size": self.world_size, "format": FORMAT_VERSION}
        files["state.json"] = json.dumps(state, indent=2, sort_keys=True, default=str).encode()
        return files

    @staticmethod
    def _write(final: Path, tmp: Path, files: dict[str, bytes]) -> None:
        needed = sum(map(len, files.values()))
        with storage_errors(final, needed):
            ensure_free(tmp, needed)
            for name, blob in files.items():
                with open(tmp / name, "wb") as fh:
                    fh.write(blob)
                    fh.flush()
                    os.fsync(fh.fileno())
            fsync_dir(tmp)

    def _prune(self) -> None:
        ckpts = list_checkpoints(self.root)
        for old in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint removed (keep_last=%d): %s", self.keep_last, old)
        for tmp in self.root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- reading
    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from: None (start fresh), the newest valid one, or a given dir.

        'latest' skips damaged checkpoints with a warning; an explicit directory must be valid.
        """
        if resume == "none":
            return None
        if resume != "latest":
            path = Path(resume)
            if not path.is_dir():
                raise CheckpointError(f"train.resume={resume!r}: no such checkpoint directory")
            verify_checkpoint(path)
            return path
        for path in reversed(list_checkpoints(self.root)):
            try:
                verify_checkpoint(path)
            except CheckpointError as exc:
                log.warning("skipping damaged checkpoint: %s", exc)
                continue
            return path
        return None

    def check_fresh_start(self) -> None:
        """Refuse to start a run from scratch where checkpoints of another run already are.

        Their steps would interleave with the new run's: `resume: latest` would later continue the
        OTHER run if its step is higher, and pruning (oldest step first) would delete the new run's
        checkpoints before the stale ones."""
        stale = list_checkpoints(self.root)
        if stale:
            names = ", ".join(p.name for p in stale[-3:])
            raise CheckpointError(
                f"{self.root}: holds {len(stale)} checkpoint(s) of an earlier run ({names}) that "
                "this run does not resume from (train.resume=none, or none of them is valid); a fresh "
                "run there would mix with them. Use another output directory, delete this one, or "
                "set train.resume=latest to continue that run."
            )

    def load(self, path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
        """Load a verified checkpoint; refuses it when incompatible with the current config."""
        path = Path(path)
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{path / 'state.json'}: unreadable ({exc})") from None
        check_compatible(state.get("compat", {}), self.compat, path)
        adapters = {n: load_file(str(path / f"adapter-{n}.safetensors"), device="cpu") for n in ADAPTERS}
        # weights_only: a checkpoint directory may come from elsewhere (train.resume: <dir>); never
        # unpickle arbitrary objects. Everything saved here is tensors and plain Python values.
        objects = torch.load(path / "objects.pt", map_location=map_location, weights_only=True)
        rank_file = path / f"rank{self.rank}.pt"
        rank_state = torch.load(rank_file, weights_only=True) if rank_file.is_file() else {}
        if not rank_state:
            # Every random draw of the trainer is seeded by (seed, epoch, global index), so a resume
            # with another process count is still exact; only the global RNG streams are not restored.
            log.warning(
                "%s: no state for rank %d (process count changed?); RNG not restored", path, self.rank
            )
        return Checkpoint(
            state=state,
            adapters=adapters,
            objects=objects,
            rng=rank_state.get("rng"),
            rank_extra=rank_state.get("extra", {}),
            path=path,
        )
