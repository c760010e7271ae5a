"""marble.io: atomic publishing, normal permissions, one clear error for a failed write, nothing left behind."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from marble.errors import StorageError
from marble.io import (
    as_storage_oserror,
    atomic_write_text,
    file_sha256,
    normal_mode,
    process_umask,
    publish_dir,
    staged_dir,
)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert process_umask() == 0o027 and normal_mode(True) == 0o750 and normal_mode(False) == 0o640
        assert os.umask(0o027) == 0o027  # unchanged by the read
    finally:
        os.umask(old)


def test_published_files_and_directories_get_normal_permissions(tmp_path):
    # mkstemp / mkdtemp create 0600 / 0700: another pod (another uid) on a shared volume could not read
    old = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "a" / "manifest.json", "{}")
        with staged_dir(tmp_path / "out") as tmp:
            atomic_write_text(tmp / "x.json", "1")
            (tmp / "sub").mkdir()
    finally:
        os.umask(old)
    assert f.read_text() == "{}" and _mode(f) == 0o644
    assert _mode(tmp_path / "out") == 0o755 and _mode(tmp_path / "out" / "x.json") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "out"]  # no temporary left


def test_staged_dir_replaces_an_old_output_only_when_done(tmp_path):
    out = tmp_path / "out"
    with staged_dir(out) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(ValueError), staged_dir(out) as tmp:
        (tmp / "v").write_text("2")
        raise ValueError("crash mid-write")
    assert (out / "v").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with staged_dir(out) as tmp:
        (tmp / "v").write_text("3")
    assert (out / "v").read_text() == "3" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_first_publisher_wins_when_replace_is_off(tmp_path):
    first, second = tmp_path / "t1", tmp_path / "t2"
    for d, v in ((first, "a"), (second, "b")):
        d.mkdir()
        (d / "v").write_text(v)
    assert publish_dir(first, tmp_path / "out", replace=False)
    assert not publish_dir(second, tmp_path / "out", replace=False)
    assert (tmp_path / "out" / "v").read_text() == "a" and not second.exists()


def test_enospc_inside_a_staged_dir_is_one_error_with_path_and_bytes(tmp_path):
    out = tmp_path / "eval"
    with pytest.raises(StorageError) as err, staged_dir(out) as tmp:
        (tmp / "images.bin").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "report.html"))
    msg = str(err.value)
    assert str(out) in msg and "No space left on device" in msg and "report.html" in msg
    assert "1,000 bytes written" in msg and "bytes free" in msg and "free some space" in msg
    assert list(tmp_path.iterdir()) == []  # the partial output is gone


def test_a_known_size_that_does_not_fit_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.disk_usage", lambda p: _Usage(free=500))
    with (
        pytest.raises(StorageError, match=r"it needed 2,048 bytes, 500 bytes free"),
        staged_dir(tmp_path / "ckpt", needed=2048),
    ):
        pytest.fail("nothing may be written")
    assert list(tmp_path.iterdir()) == []


class _Usage:
    def __init__(self, free):
        self.free = free


def test_rust_writer_errors_keep_their_errno():
    from safetensors import SafetensorError

    exc = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert as_storage_oserror(exc).errno == errno.ENOSPC
    assert as_storage_oserror(SafetensorError("invalid header")) is None
    assert as_storage_oserror(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) is None  # not storage
    assert as_storage_oserror(ValueError("(os error 28)")) is None


def test_file_sha256_reads_in_chunks(tmp_path):
    import hashlib

    p = tmp_path / "w"
    p.write_bytes(os.urandom(3 * 1024 + 5))
    assert file_sha256(p, chunk=1024) == hashlib.sha256(p.read_bytes()).hexdigest()


_WRITER = """
import resource, signal, sys, torch
from marble.io import staged_dir
from safetensors.torch import save_file
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the failing write returns EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
with staged_dir(sys.argv[1]) as tmp:
    save_file({"w": torch.zeros(10_000)}, str(tmp / "adapter.safetensors"))
"""


def test_a_real_failing_write_through_safetensors_is_reported_and_cleaned(tmp_path):
    """A real kernel refusal (a file-size limit: EFBIG) inside safetensors' Rust writer."""
    out = tmp_path / "adapter"
    proc = subprocess.run(
        [sys.executable, "-c", _WRITER, str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "StorageError" in proc.stderr and str(out) in proc.stderr and "File too large" in proc.stderr
    assert list(tmp_path.iterdir()) == []
