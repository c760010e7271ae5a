"""The models a config loads, cached and locked: the `cache-rewards` stage, `marble lock`, the run's `Hub`.

A config loads the base model's repo (`marble.models.loading.base_model_artifacts`) and every reward's
(`Reward.artifacts`: models, processors, tokenizers, auxiliary checkpoints). This module is the one
place that knows both, so it lists them (`required_artifacts`), snapshots them into the verified cache
(`cache_models`), writes and checks the model lock from those snapshots (`lock_models`, `check_lock`),
and builds the `Hub` a stage loads through (`run_hub`), refusing a config the lock does not cover.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from marble.config import MarbleConfig
from marble.errors import LockError
from marble.hub import Artifact, Hub
from marble.hub.lock import (
    LockedFile,
    LockedModel,
    ModelLock,
    check_records,
    lock_path_for,
    read_lock,
    write_lock,
)
from marble.hub.snapshots import (
    MANIFEST,
    MIRROR_ENV,
    find_entry,
    holds_pickles,
    load_manifest,
    original_records,
    read_manifest,
    snapshot,
    verify_entry,
    write_manifest,
)
from marble.io import atomic_write_text

log = logging.getLogger(__name__)


def required_artifacts(cfg: MarbleConfig) -> list[tuple[Artifact, list[str]]]:
    """Every (artifact, users) the config loads, deduplicated by (id, revision, patterns), config order."""
    from marble.models.loading import base_model_artifacts
    from marble.rewards.registry import reward_class

    needed: dict[tuple, tuple[Artifact, list[str]]] = {}
    pairs = [(art, spec.name) for spec in cfg.rewards for art in reward_class(spec.kind).artifacts(spec)]
    pairs += [(art, "base_model") for art in base_model_artifacts(cfg.model)]
    for art, user in pairs:
        needed.setdefault((art.id, art.revision, art.allow_patterns), (art, []))[1].append(user)
    return list(needed.values())


# ------------------------------------------------------------------------------------- the lock
def lock_problems(cfg: MarbleConfig, lock: ModelLock) -> tuple[list[str], list[str]]:
    """(what the lock lacks for this config, lock entries the config no longer uses)."""
    needed = required_artifacts(cfg)
    lacking = []
    for art, users in needed:
        entry = lock.entry(art.id)
        if entry is None:
            lacking.append(f"{art.id!r} (used by {', '.join(users)}) has no entry")
        elif art.revision and entry.revision and art.revision != entry.revision:
            lacking.append(f"{art.id!r}: the config pins {art.revision}, the lock {entry.revision}")
        elif not entry.covers(art.allow_patterns):
            lacking.append(f"{art.id!r}: its files {list(art.allow_patterns or ['*'])} are not locked")
    stale = sorted(set(lock.models) - {art.id for art, _ in needed})
    return lacking, stale


def check_lock_covers(cfg: MarbleConfig, lock: ModelLock, config_hint: str | None = None) -> None:
    """Refuse a config with a model the lock does not pin (with the command that updates the lock)."""
    lacking, _ = lock_problems(cfg, lock)
    if lacking:
        config = config_hint or lock.config or "<config>"
        raise LockError(
            f"the model lock of {config} does not cover this config: {'; '.join(lacking)}. Run "
            f"`marble lock --config {config}` to add new models (`--update` to re-resolve all)"
        )


def lock_parameters(lock: ModelLock | None) -> dict[str, Any]:
    """The lock as the pipeline's parameters: `model_lock` (its content) and `model_lock_sha256` (its
    identity, recorded in the compiled pipeline); `{}` and `""` without a lock."""
    return {"model_lock": lock.to_dict() if lock else {}, "model_lock_sha256": lock.sha256 if lock else ""}


def lock_from_parameters(model_lock: dict, model_lock_sha256: str) -> ModelLock | None:
    """The run's lock from the pipeline's parameters, refused when its content is not the lock whose
    hash the run records (a lock overridden without its hash, or the other way round)."""
    from marble.hub.lock import lock_from_dict

    if not model_lock and not model_lock_sha256:
        return None
    lock = lock_from_dict(model_lock, "pipeline parameter model_lock") if model_lock else None
    if lock is None or lock.sha256 != model_lock_sha256:
        raise LockError(
            f"pipeline parameters: model_lock (sha256 {lock.sha256 if lock else 'none'}) is not the lock "
            f"model_lock_sha256 records ({model_lock_sha256 or 'none'}); pass both from the same lock file"
        )
    return lock


def load_lock_for(config_path: str | Path) -> ModelLock | None:
    """The lock beside `config_path`, or None when there is none."""
    path = lock_path_for(config_path)
    return read_lock(path) if path.is_file() else None


def run_hub(
    cfg: MarbleConfig, *, cache_dir=None, lock: ModelLock | None = None, manifest_sha256: str | None = None,
    config_hint: str | None = None,
) -> Hub:  # fmt: skip
    """The `Hub` a stage loads models through; refuses up front a config the lock does not cover and a
    cache manifest that differs from the sha256 the run recorded."""
    if lock is not None:
        check_lock_covers(cfg, lock, config_hint)
    if cache_dir and manifest_sha256:
        load_manifest(Path(cache_dir), manifest_sha256)
    return Hub.create(
        offline=cfg.model.offline, cache_dir=cache_dir, lock=lock, manifest_sha256=manifest_sha256
    )


# ------------------------------------------------------------------------------------- the cache
def _plan(
    cfg: MarbleConfig, old: dict, out_dir: Path, lock: ModelLock | None, add_missing: bool, refresh: bool
):
    """(artifacts to snapshot with their lock entries, old entries kept). Kept entries are checked
    against the lock; a pinned entry written before pickles were converted is snapshotted again."""
    todo, kept_paths = [], set()
    for art, users in required_artifacts(cfg):
        pinned = lock.entry(art.id) if lock is not None else None
        covered = pinned is not None and pinned.covers(art.allow_patterns)
        if lock is not None and not covered and not add_missing:
            check_lock_covers(cfg, lock)  # raises, naming every model the lock lacks
        locked = pinned if covered else None  # a new use of a locked repo: same commit, files added
        revision = (pinned.revision if pinned else None) or art.revision
        entry = find_entry(old, art.id, revision, art.allow_patterns or ())
        if entry is None or holds_pickles(entry) or (refresh and art.revision is None and pinned is None):
            todo.append((art, users, locked, revision))
            continue
        if locked is not None:
            check_records(
                art.id, locked, original_records(entry), art.allow_patterns, str(out_dir / entry["path"])
            )
        kept_paths.add(entry["path"])
    replaced = {(a.id, a.allow_patterns or ()) for a, *_ in todo}
    kept = [e for e in old["artifacts"] if (e["id"], tuple(e["allow_patterns"] or ())) not in replaced]
    return todo, kept


def cache_models(
    cfg: MarbleConfig, out_dir: Path, *, offline: bool | None = None, lock: ModelLock | None = None,
    mirror: Path | None = None, add_missing: bool = False, refresh: bool = False,
) -> Path:  # fmt: skip
    """Snapshot every artifact the config needs into `out_dir` (the `cache-rewards` stage); returns the
    manifest path.

    Idempotent: with a manifest already listing every artifact, it verifies them and writes nothing.
    With a `lock`, snapshots are taken at the locked revisions and refused when a file differs from it
    (a model the lock lacks is refused unless `add_missing`); `refresh` re-resolves unpinned repos.
    """
    out_dir = Path(out_dir)
    offline = Hub.create(offline=cfg.model.offline if offline is None else offline).offline
    mirror = mirror or (Path(os.environ[MIRROR_ENV]) if os.environ.get(MIRROR_ENV) else None)
    manifest_path = out_dir / MANIFEST
    old = read_manifest(out_dir) if manifest_path.exists() else {"artifacts": []}
    for entry in old["artifacts"]:
        verify_entry(out_dir, entry)
    todo, kept = _plan(cfg, old, out_dir, lock, add_missing, refresh)
    lock_sha = lock.sha256 if lock is not None else None
    if manifest_path.exists() and not todo and old.get("model_lock_sha256") == lock_sha:
        log.info("reward cache %s verified (%d snapshots); nothing to do", out_dir, len(old["artifacts"]))
        return manifest_path
    new = [
        snapshot(out_dir, a, u, mirror=mirror, offline=offline, locked=locked, pin=pin)
        for a, u, locked, pin in todo
    ]
    return write_manifest(out_dir, kept + new, _manifest_info(cfg, kept + new, lock_sha))


def _manifest_info(cfg: MarbleConfig, entries: list[dict], lock_sha: str | None) -> dict[str, Any]:
    from marble.rewards.registry import reward_class

    offline = [s.name for s in cfg.rewards if not reward_class(s.kind).artifacts(s)]
    note = "every reward is offline (no weights to cache)" if not entries else (
        f"{len(entries)} snapshot(s); offline rewards need none"
    )  # fmt: skip
    if cfg.model.is_tiny:
        note += "; the base model 'tiny' is built locally, not cached"
    return {
        "config_hash": cfg.config_hash(),
        "base_model": cfg.model.pretrained,
        "model_lock_sha256": lock_sha,
        "offline_rewards": offline,
        "note": note,
    }


# ------------------------------------------------------------------------------------- marble lock
def unpinnable_rewards(cfg: MarbleConfig) -> list[str]:
    """Rewards that load weights marble does not fetch (a library's own downloader): no lock covers them."""
    from marble.rewards.registry import reward_class

    return [
        f"{s.name} ({s.kind}, backend {getattr(s, 'backend', '?')})"
        for s in cfg.rewards
        if getattr(reward_class(s.kind), "requires_weights", False) and not reward_class(s.kind).artifacts(s)
    ]


def lock_from_cache(cfg: MarbleConfig, cache_dir: Path, config_name: str | None) -> ModelLock:
    """The lock of `cfg` from the snapshots in `cache_dir` (every artifact must be cached there)."""
    manifest = read_manifest(cache_dir)
    models: dict[str, dict[str, Any]] = {}
    for art, users in required_artifacts(cfg):
        entry = find_entry(manifest, art.id, art.revision, art.allow_patterns or ())
        if entry is None:
            raise LockError(
                f"{cache_dir / MANIFEST}: {art.id!r} is not cached; run `marble cache-rewards` first"
            )
        m = models.setdefault(
            art.id, {"revision": entry["revision"], "users": [], "patterns": [], "files": {}}
        )
        if m["revision"] != entry["revision"]:
            raise LockError(f"{art.id!r} is loaded at two revisions ({m['revision']}, {entry['revision']})")
        m["source"] = entry["source"].split(":")[0]  # no machine paths in a committed file
        m["users"] += [u for u in users if u not in m["users"]]
        m["patterns"].append(list(art.allow_patterns) if art.allow_patterns is not None else None)
        for rec in original_records(entry):
            m["files"][rec["path"]] = LockedFile(size=rec["size"], sha256=rec["sha256"])
    unpinned = unpinnable_rewards(cfg)
    if unpinned:
        log.warning("not covered by the model lock (their library downloads its own weights): %s", unpinned)
    return ModelLock(
        config=config_name,
        unpinned=unpinned,
        models={
            k: LockedModel(
                revision=m["revision"],
                source=m["source"],
                used_by=m["users"],
                patterns=m["patterns"],
                files=m["files"],
            )
            for k, m in models.items()
        },
    )


def lock_models(
    cfg: MarbleConfig,
    path: Path,
    cache_dir: Path,
    *,
    config_name: str | None = None,
    update: bool = False,
    mirror: Path | None = None,
) -> tuple[ModelLock, bool]:
    """Write the lock file `path` from verified snapshots in `cache_dir` (taken there as `cache-rewards`
    does). Keeps existing pins and adds models the lock lacks; `update` re-resolves every model.
    Returns (lock, whether the file changed)."""
    path = Path(path)
    old = read_lock(path) if path.is_file() else None
    keep = None if update else old
    cache_models(cfg, cache_dir, lock=keep, mirror=mirror, add_missing=True, refresh=update)
    lock = lock_from_cache(cfg, cache_dir, config_name)
    _record_lock(cache_dir, lock)
    if old is not None and old == lock:
        return lock, False
    write_lock(path, lock)
    log.debug("model lock written: %s (%d model repos, sha256 %s)", path, len(lock.models), lock.sha256[:16])
    return lock, True


def _record_lock(cache_dir: Path, lock: ModelLock) -> None:
    """Record in the cache manifest the lock its snapshots were just hashed into."""
    manifest = read_manifest(cache_dir)
    if manifest.get("model_lock_sha256") != lock.sha256:
        manifest["model_lock_sha256"] = lock.sha256
        atomic_write_text(Path(cache_dir) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def check_lock(cfg: MarbleConfig, config_path: Path, cache_dir: Path | None) -> str:
    """Verify without writing: the lock covers exactly this config, and every snapshot already in the
    reward cache matches it (nothing is downloaded). Returns a report; raises `LockError`."""
    path = lock_path_for(config_path)
    if not path.is_file():
        raise LockError(f"{path}: no model lock; run `marble lock --config {config_path}`")
    lock = read_lock(path)
    lacking, stale = lock_problems(cfg, lock)
    problems = lacking + [f"{m!r} is locked but no longer used" for m in stale]
    if problems:
        raise LockError(
            f"{path}: out of date: {'; '.join(problems)}. Run `marble lock --config {config_path}`"
        )
    has_cache = cache_dir is not None and (Path(cache_dir) / MANIFEST).is_file()
    manifest = read_manifest(cache_dir) if has_cache else {"artifacts": []}
    lines = [
        f"{path}: covers the {len(lock.models)} model repo(s) of {config_path} (lock {lock.sha256[:16]})"
    ]
    for art, _ in required_artifacts(cfg):
        locked = lock.models[art.id]
        entry = find_entry(manifest, art.id, locked.revision or art.revision, art.allow_patterns or ())
        if entry is None:
            lines.append(f"  {art.id}: not in the reward cache, not checked")
            continue
        verify_entry(Path(cache_dir), entry)
        check_records(
            art.id, locked, original_records(entry), art.allow_patterns, str(Path(cache_dir) / entry["path"])
        )
        lines.append(f"  {art.id}: {len(entry['files'])} cached file(s) match the lock")
    return "\n".join(lines)
