"""The verified snapshot cache: local copies of model repos, each file listed with its size and sha256.

Layout of a cache directory:
```
<out>/manifest.json                        what is cached, each file with size and sha256
<out>/snapshots/<org>--<name>@<revision>/  one directory per (repo, revision, file patterns)
```
Sources, in order: a local directory named by the config (copied), a local mirror (`mirror=` or
`$MARBLE_HUB_MIRROR`, laid out as `<mirror>/<org>/<name>/`), else the hub (`snapshot_download` at the
pinned revision; an unpinned repo is pinned to the commit it resolves to, recorded in the manifest).
Symbolic links in a source are refused. Torch pickles are converted to safetensors here, once
(`marble.hub.weights`); the manifest lists the conversion with the original's hash (`converted_from`).
Each snapshot is written to a temporary directory and renamed; the manifest is written atomically last,
so an interrupted run leaves no entry that points at a partial snapshot.

On load (`cached_snapshot`) the entry's files are checked against the manifest (presence, size, sha256;
unexpected extra files and links too); any difference is a `CacheError` naming the file. When the run
knows the manifest's own sha256 (recorded when the cache was written), a manifest that differs from it
is refused before anything in it is trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marble.errors import CacheError
from marble.hub.artifact import Artifact
from marble.hub.files import copy_files, file_records, list_files
from marble.hub.lock import LockedModel, check_records
from marble.hub.weights import convert_to_safetensors, converted_name, is_pickle
from marble.io import as_storage_oserror, atomic_write_text, bytes_sha256, file_sha256, staged_dir

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "marble-reward-cache/1"
MIRROR_ENV = "MARBLE_HUB_MIRROR"
VERIFY_ENV = "MARBLE_CACHE_VERIFY"
"""`full` (default): sizes and sha256 on load; `size`: sizes only (faster start for >10 GB snapshots;
`cache-rewards` itself always verifies in full)."""

_VERIFIED: dict[tuple[str, str, str], set[str]] = {}
"""(cache dir, manifest sha256, mode) -> snapshot dirs verified in this process (hashing GBs once is enough)."""


# ------------------------------------------------------------------------------------- manifest
def load_manifest(cache_dir: Path, expected_sha256: str | None = None) -> tuple[dict[str, Any], str]:
    """(manifest, sha256 of its bytes); refused when `expected_sha256` is given and differs."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file() or path.is_symlink():
        raise CacheError(f"{path}: no reward-cache manifest; run `marble cache-rewards --out {cache_dir}`")
    blob = path.read_bytes()  # hashed and parsed from the same bytes
    digest = bytes_sha256(blob)
    if expected_sha256 and digest != expected_sha256:
        raise CacheError(
            f"{path}: sha256 {digest} differs from the {expected_sha256} this run recorded when the cache "
            "was written (the manifest changed on the volume); rerun the cache-rewards stage"
        )
    try:
        manifest = json.loads(blob)
    except json.JSONDecodeError as exc:
        raise CacheError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise CacheError(f"{path}: format {got!r}, expected {FORMAT!r}")
    return manifest, digest


def read_manifest(cache_dir: Path) -> dict[str, Any]:
    return load_manifest(cache_dir)[0]


def manifest_sha256(cache_dir: Path) -> str:
    return file_sha256(Path(cache_dir) / MANIFEST)


def write_manifest(out_dir: Path, entries: list[dict], info: dict[str, Any]) -> Path:
    manifest = {
        "format": FORMAT,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
        "artifacts": entries,
    }
    return atomic_write_text(Path(out_dir) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def find_entry(manifest: dict[str, Any], model: str, revision: str | None, patterns=None) -> dict | None:
    """The entry for `model` at `revision` (the requested or the resolved one), optionally same patterns."""
    for e in manifest.get("artifacts", []):
        if e["id"] != model or revision not in (e.get("requested_revision"), e.get("revision")):
            continue
        if patterns is not None and tuple(e["allow_patterns"] or ()) != tuple(patterns):
            continue
        return e
    return None


def original_records(entry_or_files) -> list[dict[str, Any]]:
    """The files as the source served them: a converted file is reported as its original pickle."""
    files = entry_or_files["files"] if isinstance(entry_or_files, dict) else entry_or_files
    return [f.get("converted_from") or f for f in files]


def holds_pickles(entry: dict[str, Any]) -> bool:
    """True for an entry written before pickles were converted (it must be snapshotted again)."""
    return any(is_pickle(f["path"]) for f in entry.get("files", []))


# ------------------------------------------------------------------------------------- verifying
def verify_entry(cache_dir: Path, entry: dict[str, Any], *, hashes: bool = True) -> None:
    """Refuse a snapshot whose files differ from the manifest (missing, resized, altered, extra, links).

    hashes=False checks presence and sizes only.
    """
    root = Path(cache_dir) / entry["path"]
    if not root.is_dir() or root.is_symlink():
        raise CacheError(f"{root}: snapshot of {entry['id']!r} listed in {cache_dir / MANIFEST} is missing")
    present = set(list_files(root))  # refuses links
    listed = {f["path"]: f for f in entry["files"]}
    for rel, rec in listed.items():
        path = root / rel
        if rel not in present:
            raise CacheError(
                f"{path}: missing from the cached snapshot of {entry['id']!r} (partial snapshot)"
            )
        if path.stat().st_size != rec["size"]:
            raise CacheError(
                f"{path}: size {path.stat().st_size} != {rec['size']} in the manifest (partial or tampered)"
            )
        if hashes and file_sha256(path) != rec["sha256"]:
            raise CacheError(f"{path}: sha256 differs from the manifest (tampered or corrupted)")
    extra = sorted(present - set(listed))
    if extra:
        raise CacheError(
            f"{root / extra[0]}: file not in the manifest of {entry['id']!r} (tampered snapshot)"
        )


def cached_snapshot(
    cache_dir: Path, model: str, revision: str | None, expected_sha256: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """Verified local snapshot of `model` at `revision` in a cache, and its manifest entry (verification
    memoised per manifest content)."""
    cache_dir = Path(cache_dir)
    manifest, digest = load_manifest(cache_dir, expected_sha256)
    entry = find_entry(manifest, model, revision)
    if entry is None:
        raise CacheError(
            f"{cache_dir / MANIFEST}: no snapshot of {model!r} at revision {revision}; rerun "
            "`marble cache-rewards` with this config"
        )
    mode = os.environ.get(VERIFY_ENV, "full").strip().lower()
    if mode not in ("full", "size"):
        raise CacheError(f"{VERIFY_ENV}={mode!r}: use 'full' or 'size'")
    done = _VERIFIED.setdefault((str(cache_dir.resolve()), digest, mode), set())
    if entry["path"] not in done:
        verify_entry(cache_dir, entry, hashes=mode == "full")
        done.add(entry["path"])
    return cache_dir / entry["path"], entry


# ------------------------------------------------------------------------------------- fetching
@dataclass(frozen=True)
class Source:
    kind: str  # "local", "mirror" or "hub"
    path: Path | None  # the directory to copy from (local, mirror)
    revision: str | None  # what the snapshot is pinned to

    @property
    def description(self) -> str:
        return f"{self.kind}:{self.path.resolve()}" if self.path is not None else self.kind


def resolve_source(art: Artifact, mirror: Path | None, offline: bool, pin: str | None = None) -> Source:
    """Where `art` comes from and the revision it is pinned to (`pin`, the config's revision, or for
    an unpinned hub repo today's commit)."""
    revision = pin or art.revision
    local = Path(art.id).expanduser()
    if local.is_dir():
        return Source("local", local, revision)
    if mirror is not None and (mirror / art.id).is_dir():
        return Source("mirror", mirror / art.id, revision)
    if offline:
        raise CacheError(
            f"cannot snapshot {art.id!r}: offline (model.offline or HF_HUB_OFFLINE) and it is neither a "
            f"local directory nor in a mirror ({MIRROR_ENV}=<dir> with <dir>/{art.id}/)"
        )
    if revision is None:
        from huggingface_hub import HfApi

        revision = _hub_call(art, lambda: HfApi().model_info(art.id).sha)
    return Source("hub", None, revision)


def _hub_call(art: Artifact, fn):
    try:
        return fn()
    except Exception as exc:  # offline, 404, auth, network: one actionable message
        if as_storage_oserror(exc) is not None:
            raise  # a full disk is reported as such by the caller
        raise CacheError(
            f"cannot snapshot {art.id!r} (revision {art.revision}) from the hub: {exc}. Run where the hub is "
            f"reachable, or provide a local mirror ({MIRROR_ENV}=<dir> with <dir>/{art.id}/)"
        ) from exc


def _download(art: Artifact, src: Source, tmp: Path, locked: LockedModel | None) -> None:
    """Fill `tmp` with the artifact's files from its source."""
    if src.path is not None:
        copy_files(src.path, tmp, [r for r in list_files(src.path) if art.matches(r)])
        return
    from huggingface_hub import HfApi, snapshot_download

    if locked is not None:  # exactly the locked files
        patterns = sorted(locked.files_matching(art.allow_patterns))
    else:
        patterns = list(art.allow_patterns) if art.allow_patterns else None
        if patterns and "*.bin" in patterns:
            files = _hub_call(art, lambda: HfApi().list_repo_files(art.id, revision=src.revision))
            if any(f.endswith(".safetensors") for f in files):
                patterns.remove("*.bin")  # same weights twice otherwise
    _hub_call(
        art,
        lambda: snapshot_download(art.id, revision=src.revision, allow_patterns=patterns, local_dir=str(tmp)),
    )
    shutil.rmtree(tmp / ".cache", ignore_errors=True)


def _convert_pickles(tmp: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace each torch pickle in the snapshot by its safetensors conversion (records updated)."""
    names = {r["path"] for r in records}
    out = []
    for rec in records:
        if not is_pickle(rec["path"]):
            out.append(rec)
            continue
        target = converted_name(rec["path"])
        if target in names:
            raise CacheError(
                f"{tmp / rec['path']}: its conversion {target!r} would replace a file of the repo"
            )
        convert_to_safetensors(tmp / rec["path"], tmp / target)
        (tmp / rec["path"]).unlink()
        out.append({**file_records(tmp, [target])[0], "converted_from": rec})
    return sorted(out, key=lambda r: r["path"])


def slug(art: Artifact, revision: str | None) -> str:
    name = art.id.strip("/").replace("/", "--") if not Path(art.id).is_absolute() else Path(art.id).name
    key = json.dumps([art.id, art.allow_patterns])  # the same repo with other patterns is another snapshot
    return f"{name}@{(revision or 'local')[:16]}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def snapshot(
    out_dir: Path, art: Artifact, users: list[str], *, mirror: Path | None = None, offline: bool = False,
    locked: LockedModel | None = None, pin: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Snapshot `art` into `out_dir/snapshots/` at revision `pin` (default: the locked one), checked
    against its lock entry before anything in it is unpickled for conversion; returns its manifest entry."""
    src = resolve_source(art, mirror, offline, pin or (locked.revision if locked is not None else None))
    rel = Path("snapshots") / slug(art, src.revision)
    needed = None
    if src.path is not None:
        needed = sum((src.path / r).stat().st_size for r in list_files(src.path) if art.matches(r))
    with staged_dir(Path(out_dir) / rel, needed=needed) as tmp:
        _download(art, src, tmp, locked)
        records = file_records(tmp, list_files(tmp))
        if not records:
            raise CacheError(f"{art.id!r}: no files matched {list(art.allow_patterns or [])}")
        if locked is not None:
            check_records(art.id, locked, records, art.allow_patterns, f"{art.id} from {src.description}")
        records = _convert_pickles(tmp, records)
    log.info("cached %s (%s) -> %s: %d files", art.id, src.revision, Path(out_dir) / rel, len(records))
    return {
        "id": art.id,
        "requested_revision": art.revision,
        "revision": src.revision,
        "source": src.description,
        "allow_patterns": list(art.allow_patterns) if art.allow_patterns else None,
        "path": rel.as_posix(),
        "used_by": users,
        "files": records,
        "total_bytes": sum(f["size"] for f in records),
    }
