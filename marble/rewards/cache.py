"""The `cache-rewards` stage: verified local snapshots of every reward model (and the base model).

Layout of a cache directory:
```
<out>/manifest.json                        what is cached, each file with size and sha256
<out>/snapshots/<org>--<name>@<revision>/  one directory per (repo, revision)
```
Sources, in order: a local directory named by the config (copied), a local mirror (`mirror=` or
`$MARBLE_HUB_MIRROR`, laid out as `<mirror>/<org>/<name>/`), else the hub (`snapshot_download` at the
pinned revision; an unpinned repo is pinned to the commit it resolves to, recorded in the manifest).
Each snapshot is written to a temporary directory and renamed; the manifest is written atomically last,
so an interrupted run leaves no entry that points at a partial snapshot.

On load (`cached_snapshot`, used by every model reward given a `cache_dir`) the entry's files are checked
against the manifest (presence, size, sha256; unexpected extra files too); any difference is a
`CacheError` naming the file. A second `cache_reward_models` run verifies and writes nothing.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from marble.config import MarbleConfig
from marble.configio import atomic_write_text
from marble.errors import CacheError
from marble.rewards.base import Artifact

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "marble-reward-cache/1"
PIPELINE_PATTERNS = ("model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model")
"""A diffusers pipeline repo without its root-level single-file checkpoints."""
MIRROR_ENV = "MARBLE_HUB_MIRROR"
VERIFY_ENV = "MARBLE_CACHE_VERIFY"
"""`full` (default): sizes and sha256 on load; `size`: sizes only (faster start for >10 GB snapshots;
`cache-rewards` itself always verifies in full)."""

_VERIFIED: dict[tuple[str, int, str], set[str]] = {}
"""(manifest path, mtime_ns, mode) -> snapshot dirs verified in this process (hashing GBs once is enough)."""


# ------------------------------------------------------------------------------------- artifacts
def required_artifacts(cfg: MarbleConfig) -> list[tuple[Artifact, list[str]]]:
    """Every (artifact, users) the config needs, deduplicated by (id, revision, patterns), config order."""
    from marble.rewards.registry import reward_class

    needed: dict[tuple, tuple[Artifact, list[str]]] = {}
    for spec in cfg.rewards:
        for art in reward_class(spec.kind).artifacts(spec):
            needed.setdefault((art.id, art.revision, art.allow_patterns), (art, []))[1].append(spec.name)
    if not cfg.model.is_tiny:
        art = Artifact(cfg.model.pretrained, cfg.model.revision, PIPELINE_PATTERNS)
        needed.setdefault((art.id, art.revision, art.allow_patterns), (art, []))[1].append("base_model")
    return list(needed.values())


def _slug(art: Artifact, revision: str | None) -> str:
    name = art.id.strip("/").replace("/", "--") if not Path(art.id).is_absolute() else Path(art.id).name
    key = json.dumps([art.id, art.allow_patterns])  # the same repo with other patterns is another snapshot
    return f"{name}@{(revision or 'local')[:16]}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _matches(rel: str, patterns: tuple[str, ...] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatch(rel, p) for p in patterns)


# ------------------------------------------------------------------------------------- hashing
def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _list_files(root: Path) -> list[str]:
    """Relative POSIX paths of the regular files under `root` (hub bookkeeping in `.cache/` excluded)."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith(".cache/"):
            out.append(rel)
    return out


def _file_records(root: Path) -> list[dict[str, Any]]:
    return [
        {"path": r, "size": (root / r).stat().st_size, "sha256": sha256_file(root / r)}
        for r in _list_files(root)
    ]


def verify_entry(cache_dir: Path, entry: dict[str, Any], *, hashes: bool = True) -> None:
    """Refuse a snapshot whose files differ from the manifest (missing, resized, altered or extra).

    hashes=False checks presence and sizes only.
    """
    root = cache_dir / entry["path"]
    if not root.is_dir():
        raise CacheError(f"{root}: snapshot of {entry['id']!r} listed in {cache_dir / MANIFEST} is missing")
    listed = {f["path"]: f for f in entry["files"]}
    for rel, rec in listed.items():
        path = root / rel
        if not path.is_file():
            raise CacheError(
                f"{path}: missing from the cached snapshot of {entry['id']!r} (partial snapshot)"
            )
        if path.stat().st_size != rec["size"]:
            raise CacheError(
                f"{path}: size {path.stat().st_size} != {rec['size']} in the manifest (partial or tampered)"
            )
        if hashes and sha256_file(path) != rec["sha256"]:
            raise CacheError(f"{path}: sha256 differs from the manifest (tampered or corrupted)")
    extra = sorted(set(_list_files(root)) - set(listed))
    if extra:
        raise CacheError(
            f"{root / extra[0]}: file not in the manifest of {entry['id']!r} (tampered snapshot)"
        )


# ------------------------------------------------------------------------------------- manifest
def read_manifest(cache_dir: Path) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"{path}: no reward-cache manifest; run `marble cache-rewards --out {cache_dir}`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CacheError(f"{path}: not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def find_entry(manifest: dict[str, Any], model: str, revision: str | None, patterns=None) -> dict | None:
    """The entry for `model` at `revision` (the requested or the resolved one), optionally same patterns."""
    for e in manifest.get("artifacts", []):
        if e["id"] != model or revision not in (e.get("requested_revision"), e.get("revision")):
            continue
        if patterns is not None and tuple(e["allow_patterns"] or ()) != tuple(patterns):
            continue
        return e
    return None


def cached_snapshot(cache_dir: Path, model: str, revision: str | None) -> Path:
    """Verified local snapshot of `model` at `revision` in a reward cache (verification memoised)."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    entry = find_entry(manifest, model, revision)
    if entry is None:
        raise CacheError(
            f"{cache_dir / MANIFEST}: no snapshot of {model!r} at revision {revision}; rerun "
            "`marble cache-rewards` with this config"
        )
    mode = os.environ.get(VERIFY_ENV, "full").strip().lower()
    if mode not in ("full", "size"):
        raise CacheError(f"{VERIFY_ENV}={mode!r}: use 'full' or 'size'")
    mpath = cache_dir / MANIFEST
    done = _VERIFIED.setdefault((str(mpath.resolve()), mpath.stat().st_mtime_ns, mode), set())
    if entry["path"] not in done:
        verify_entry(cache_dir, entry, hashes=mode == "full")
        done.add(entry["path"])
    return cache_dir / entry["path"]


# ------------------------------------------------------------------------------------- fetching
def _copy_tree(src: Path, dst: Path, patterns: tuple[str, ...] | None) -> None:
    for rel in _list_files(src):
        if _matches(rel, patterns):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)


def _fetch(art: Artifact, tmp: Path, mirror: Path | None) -> tuple[str, str | None]:
    """Fill `tmp` with the artifact's files; returns (source description, resolved revision)."""
    local = Path(art.id).expanduser()
    if local.is_dir():
        _copy_tree(local, tmp, art.allow_patterns)
        return f"local:{local.resolve()}", art.revision
    if mirror is not None and (mirror / art.id).is_dir():
        _copy_tree(mirror / art.id, tmp, art.allow_patterns)
        return f"mirror:{(mirror / art.id).resolve()}", art.revision
    from marble.rewards.hub import hub_offline

    if hub_offline():
        raise CacheError(
            f"cannot snapshot {art.id!r}: HF_HUB_OFFLINE is set and it is neither a local directory nor in a "
            f"mirror ({MIRROR_ENV}=<dir> with <dir>/{art.id}/)"
        )
    try:
        from huggingface_hub import HfApi, snapshot_download

        api = HfApi()
        revision = art.revision or api.model_info(art.id).sha  # pin an unpinned repo to today's commit
        patterns = list(art.allow_patterns) if art.allow_patterns else None
        if patterns and "*.bin" in patterns:
            files = api.list_repo_files(art.id, revision=revision)
            if any(f.endswith(".safetensors") for f in files):
                patterns.remove("*.bin")  # same weights twice otherwise
        snapshot_download(art.id, revision=revision, allow_patterns=patterns, local_dir=str(tmp))
    except Exception as exc:  # offline, 404, auth, network: one actionable message
        raise CacheError(
            f"cannot snapshot {art.id!r} (revision {art.revision}) from the hub: {exc}. Run where the hub is "
            f"reachable, or provide a local mirror ({MIRROR_ENV}=<dir> with <dir>/{art.id}/)"
        ) from exc
    shutil.rmtree(tmp / ".cache", ignore_errors=True)
    return "hub", revision


def _snapshot(out_dir: Path, art: Artifact, users: list[str], mirror: Path | None) -> dict[str, Any]:
    (out_dir / "snapshots").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir / "snapshots", prefix=".partial-"))
    try:
        source, revision = _fetch(art, tmp, mirror)
        files = _file_records(tmp)
        if not files:
            raise CacheError(f"{art.id!r}: no files matched {list(art.allow_patterns or [])}")
        rel = Path("snapshots") / _slug(art, revision)
        final = out_dir / rel
        if final.exists():  # left over from a run that died before writing the manifest
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("cached %s (%s) -> %s: %d files", art.id, revision, final, len(files))
    return {
        "id": art.id,
        "requested_revision": art.revision,
        "revision": revision,
        "source": source,
        "allow_patterns": list(art.allow_patterns) if art.allow_patterns else None,
        "path": rel.as_posix(),
        "used_by": users,
        "files": files,
        "total_bytes": sum(f["size"] for f in files),
    }


def cache_reward_models(cfg: MarbleConfig, out_dir: Path, *, mirror: Path | None = None) -> Path:
    """Snapshot every artifact the config needs into `out_dir`; returns the manifest path.

    Idempotent: with a manifest already listing every artifact, it verifies them and writes nothing.
    A tampered or partial cached snapshot is a `CacheError` naming the file (delete it to re-fetch).
    """
    out_dir = Path(out_dir)
    mirror = mirror or (Path(os.environ[MIRROR_ENV]) if os.environ.get(MIRROR_ENV) else None)
    manifest_path = out_dir / MANIFEST
    old = read_manifest(out_dir) if manifest_path.exists() else {"artifacts": []}
    for entry in old["artifacts"]:
        verify_entry(out_dir, entry)
    needed = required_artifacts(cfg)
    missing = [(a, u) for a, u in needed if find_entry(old, a.id, a.revision, a.allow_patterns or ()) is None]
    if manifest_path.exists() and not missing:
        log.info("reward cache %s verified (%d snapshots); nothing to do", out_dir, len(old["artifacts"]))
        return manifest_path
    entries = list(old["artifacts"]) + [_snapshot(out_dir, a, u, mirror) for a, u in missing]
    offline = [s.name for s in cfg.rewards if not _artifacts_of(s)]
    manifest = {
        "format": FORMAT,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config_hash": cfg.config_hash(),
        "base_model": cfg.model.pretrained,
        "offline_rewards": offline,
        "note": (
            "every reward is offline (no weights to cache)"
            if not entries
            else f"{len(entries)} snapshot(s); offline rewards need none"
        )
        + ("; the base model 'tiny' is built locally, not cached" if cfg.model.is_tiny else ""),
        "artifacts": entries,
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return manifest_path


def _artifacts_of(spec) -> list[Artifact]:
    from marble.rewards.registry import reward_class

    return reward_class(spec.kind).artifacts(spec)
