"""Listing, hashing and copying the files of a model directory, refusing symbolic links.

A link inside a mirror or a cached snapshot could point anywhere (a service-account token, another
user's files): copying or loading through it would put that file on the shared volume or into a model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from marble.errors import CacheError
from marble.io import file_sha256, normal_mode

HUB_BOOKKEEPING = ".cache/"
"""`snapshot_download(local_dir=...)` keeps its own metadata here; it is not part of the model."""


def list_files(root: Path) -> list[str]:
    """Relative POSIX paths of the regular files under `root`, sorted; a symbolic link is a `CacheError`."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if rel.startswith(HUB_BOOKKEEPING) or rel + "/" == HUB_BOOKKEEPING:
                continue
            if p.is_symlink():
                raise CacheError(f"{p}: symbolic link to {os.readlink(p)!r} in a model directory (refused)")
            if name in filenames and p.is_file():
                out.append(rel)
    return sorted(out)


def file_records(root: Path, rels: list[str]) -> list[dict[str, Any]]:
    """`{"path", "size", "sha256"}` of each file."""
    return [{"path": r, "size": (root / r).stat().st_size, "sha256": file_sha256(root / r)} for r in rels]


def copy_files(src: Path, dst: Path, rels: list[str]) -> None:
    """Copy the listed files (bytes only: the copies get normal permissions, not the source's)."""
    for rel in rels:
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, target, follow_symlinks=False)
        target.chmod(normal_mode(is_dir=False))
