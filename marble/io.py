"""Writing outputs safely: atomic publish of a directory or a file, file sha256, clear storage errors.

Every output is written under a temporary name beside its final path and renamed at the end, so a reader
(the next stage, a resumed run, another pod on the shared volume) never sees half an output, and a failed
write leaves nothing behind: the temporary path is removed before the error propagates.

Published files and directories get the permissions a plain `open` / `mkdir` would give under the
process umask, not the 0600 / 0700 that `mkstemp` / `mkdtemp` create: a pod running as another uid on a
shared volume must be able to read them.

A full disk (ENOSPC), a quota, a file-size limit or another I/O failure while writing becomes ONE
`StorageError` naming the path, the bytes the write needed and the bytes free, whatever library was
writing (Python files raise `OSError`; safetensors' Rust writer raises `SafetensorError` carrying
"(os error N)"; torch's zip writer loses the errno, so marble serialises with torch into memory and
writes the bytes itself, see `torch_bytes`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from marble.errors import StorageError

log = logging.getLogger(__name__)

STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM}
)
"""Errors of the storage itself (full, over quota, file too large, failing, read-only, not writable);
other `OSError`s (network errors are `OSError`s too) propagate unchanged."""
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


# ------------------------------------------------------------------------------------ permissions
def process_umask() -> int:
    """The process umask, read without changing it (Linux: /proc; elsewhere the set-and-restore idiom)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_mode(is_dir: bool) -> int:
    """What `mkdir` (0o777) or `open` (0o666) would create under the current umask."""
    return (0o777 if is_dir else 0o666) & ~process_umask()


# ------------------------------------------------------------------------------------ hashing
def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (weights are many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------ errors
def as_storage_oserror(exc: BaseException) -> OSError | None:
    """The storage `OSError` behind `exc` (also when a Rust writer reports it as text), else None."""
    if isinstance(exc, OSError):
        return exc if exc.errno in STORAGE_ERRNOS else None
    match = _RUST_OS_ERROR.search(str(exc)) if type(exc).__name__ == "SafetensorError" else None
    if match and int(match.group(1)) in STORAGE_ERRNOS:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return None


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem holding `path` (its nearest existing ancestor), None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def tree_bytes(path: str | Path) -> int:
    """Total size of the regular files under `path` (0 if it does not exist)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def storage_error(
    path: str | Path, exc: OSError, needed: int | None, written: int | None = None
) -> StorageError:
    """One readable error for a failed write of `path` (what failed, how much it needed, what is free)."""
    free = free_bytes(path)
    what = exc.strerror or str(exc)
    if needed is not None:
        size = f"it needed {needed:,} bytes"
    elif written is not None:
        size = f"it needed more than the {written:,} bytes written before the failure"
    else:
        size = "its size is unknown"
    where = f" (while writing {exc.filename})" if getattr(exc, "filename", None) else ""
    hint = (
        "free some space (or write elsewhere) and run again"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT)
        else "fix the storage (permissions, limits, health) and run again"
    )
    free_text = f"{free:,} bytes free there" if free is not None else "free space unknown"
    return StorageError(f"{path}: cannot write: {what}{where}; {size}, {free_text}; {hint}")


@contextlib.contextmanager
def storage_errors(path: str | Path, needed: int | None = None, staged: Path | None = None) -> Iterator[None]:
    """Turn a storage failure inside the block into a `StorageError` about `path`.

    `needed`: bytes the write needs, if known; otherwise the bytes already written under `staged`
    are reported as a lower bound.
    """
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        os_exc = as_storage_oserror(exc)
        if os_exc is None:
            raise
        written = tree_bytes(staged) if staged is not None and Path(staged).exists() else None
        raise storage_error(path, os_exc, needed, written) from exc


def ensure_free(path: str | Path, needed: int) -> None:
    """Refuse before writing `needed` bytes under `path` when the filesystem has less free."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise storage_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), needed)


# ------------------------------------------------------------------------------------ files
def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    with storage_errors(path, needed=len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, normal_mode(is_dir=False))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` of `text` encoded (UTF-8 by default)."""
    return atomic_write_bytes(path, text.encode(encoding))


def torch_bytes(obj: Any) -> bytes:
    """`torch.save(obj)` into memory: written by `atomic_write_bytes`, a failed write keeps its errno
    (torch's own file writer reports a full disk as "unexpected pos", with no errno)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ directories
def make_staging_dir(final: str | Path, name: str | None = None) -> Path:
    """A new empty directory beside `final` (same filesystem, so the publishing rename is atomic),
    with normal permissions. `name` gives it a fixed name (replacing a leftover), for writers that
    several processes must find; by default the name is unique."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if name is None:
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    else:
        tmp = final.parent / name
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    tmp.chmod(normal_mode(is_dir=True))
    return tmp


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename) to disk where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_dir(tmp: str | Path, final: str | Path, *, replace: bool = True) -> bool:
    """Rename the finished `tmp` to `final`. Returns False when `final` existed and `replace=False`
    (first publisher wins: `tmp` is discarded). A previous `final` is removed only after the swap and
    restored if the swap fails."""
    tmp, final = Path(tmp), Path(final)
    fsync_dir(tmp)
    if final.exists() and not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    if not final.exists():
        try:
            os.replace(tmp, final)
        except OSError:
            if replace or not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process published it meanwhile
            return False
    else:
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-")) / "old"
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        finally:
            shutil.rmtree(old.parent, ignore_errors=True)
    fsync_dir(final.parent)
    return True


@contextlib.contextmanager
def staged_dir(final: str | Path, *, needed: int | None = None, replace: bool = True) -> Iterator[Path]:
    """Yield an empty staging directory; on success publish it as `final` (`publish_dir`), on any error
    remove it (storage failures re-raised as a `StorageError` about `final`).

    `needed`: bytes the output will take, if known: refused up front when the disk has less free.
    """
    final = Path(final)
    with storage_errors(final, needed):
        if needed is not None:
            ensure_free(final.parent if final.parent.exists() else final, needed)
        tmp = make_staging_dir(final)
    try:
        with storage_errors(final, needed, staged=tmp):
            yield tmp
            publish_dir(tmp, final, replace=replace)
    except StorageError as exc:  # raised by a writer inside: name the output, not its temporary path
        raise StorageError(str(exc).replace(str(tmp), str(final))) from exc.__cause__
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
