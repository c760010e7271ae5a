"""The `prepare` stage: read, validate, mix and split the prompt sources; write JSONL + manifest atomically.

Output directory:
    train.jsonl, test.jsonl   one PromptRecord per line (marble.data.records)
    manifest.json             sources with content hashes, counts per family and per reward
                              applicability, token limit, split settings, config and data hashes
Everything is validated in memory first; files are then written into a temporary directory beside
`out_dir`, which replaces `out_dir` only when complete. On any error nothing is left in `out_dir`
(a previous complete output stays as it was).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from marble.config import MarbleConfig
from marble.data.applicability import spec_applies
from marble.data.mixing import apply_token_limit, mix, stratified_split
from marble.data.records import PromptRecord, read_prompt_records, write_prompt_records
from marble.data.sources import RawPrompt, read_source
from marble.data.tokens import LETTERS_PER_TOKEN, token_limit
from marble.errors import DataError
from marble.io import atomic_write_text, file_sha256, staged_dir

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "marble.prompts/1"
TRAIN_FILE, TEST_FILE, MANIFEST_FILE = "train.jsonl", "test.jsonl", "manifest.json"


class PromptSet(NamedTuple):
    """A validated, mixed and split prompt set, not yet written."""

    train: list[PromptRecord]
    test: list[PromptRecord]
    sources: list[dict[str, Any]]
    duplicates_dropped: int
    truncated: int


def build_prompt_set(cfg: MarbleConfig) -> PromptSet:
    """Read every source, validate each record, apply token limits and duplicates policy, split."""
    data = cfg.data
    raw: list[RawPrompt] = []
    infos: list[dict[str, Any]] = []
    for i, src in enumerate(data.sources):
        got = read_source(src, data, i)
        log.info("source %d (%s): %d prompts", i, got.info.get("path", src.kind), len(got.prompts))
        raw.extend(got.prompts)
        infos.append(got.info)
    raw, truncated = apply_token_limit(raw, data, cfg.model.max_sequence_length)
    mixed, dropped = mix(raw, data)
    train, test = stratified_split([rec for rec, _ in mixed], data.test_fraction, data.split_seed)
    return PromptSet(train, test, infos, dropped, truncated)


def applicability_counts(
    cfg: MarbleConfig, train: list[PromptRecord], test: list[PromptRecord]
) -> dict[str, Any]:
    """Per configured reward: how many train/test prompts it applies to (marble.data.applicability)."""
    out: dict[str, Any] = {}
    for spec in cfg.rewards:
        n_train = sum(spec_applies(spec, r.prompt, r.metadata) for r in train)
        n_test = sum(spec_applies(spec, r.prompt, r.metadata) for r in test)
        out[spec.name] = {
            "kind": spec.kind,
            "held_out": spec.held_out,
            "train": n_train,
            "test": n_test,
            "total": n_train + n_test,
        }
    return out


def _check_applicability(per_reward: dict[str, Any], n_train: int, n_test: int) -> None:
    for name, c in per_reward.items():
        if not c["held_out"] and c["train"] == 0:
            raise DataError(
                f"rewards: trained reward {name!r} ({c['kind']}) applies to none of the {n_train} training prompts; "
                "add prompts it can score or mark it held_out"
            )
        if c["test"] == 0 and n_test:
            log.warning("reward %r (%s) applies to none of the %d test prompts", name, c["kind"], n_test)


def _family_counts(train: list[PromptRecord], test: list[PromptRecord]) -> dict[str, dict[str, int]]:
    tr, te = Counter(r.family for r in train), Counter(r.family for r in test)
    return {f: {"train": tr[f], "test": te[f], "total": tr[f] + te[f]} for f in sorted(tr | te)}


def data_config_hash(cfg: MarbleConfig) -> str:
    """Hash of exactly the settings that determine the prompt set (data, T5 limit, reward kinds)."""
    blob = {
        "data": cfg.data.model_dump(mode="json"),
        "max_sequence_length": cfg.model.max_sequence_length,
        "rewards": [(r.name, r.kind, r.held_out) for r in cfg.rewards],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def build_manifest(
    cfg: MarbleConfig, ps: PromptSet, files: dict[str, Path], per_reward: dict[str, Any]
) -> dict[str, Any]:
    """The manifest dict (deterministic: no timestamps, so an unchanged input gives identical bytes)."""
    file_info = {}
    data_hash = hashlib.sha256()
    for name, path in files.items():
        blob = path.read_bytes()
        data_hash.update(name.encode() + b"\0" + blob)
        file_info[name] = {"sha256": hashlib.sha256(blob).hexdigest(), "records": blob.count(b"\n")}
    limit = token_limit(cfg.model.max_sequence_length)
    return {
        "format": MANIFEST_FORMAT,
        "config_hash": cfg.config_hash(),
        "data_config_hash": data_config_hash(cfg),
        "data_hash": data_hash.hexdigest()[:16],
        "files": file_info,
        "sources": ps.sources,
        "split": {
            "test_fraction": cfg.data.test_fraction,
            "seed": cfg.data.split_seed,
            "stratified_by": "family, then named colour and position (balanced per family)",
        },
        "token_limit": {
            "max_tokens": limit.max_tokens,
            "reason": limit.reason,
            "estimate": f"word/punctuation pieces, ceil(letters/{LETTERS_PER_TOKEN}) per word (marble.data.tokens)",
            "on_overlong": cfg.data.on_overlong,
        },
        "counts": {
            "total": len(ps.train) + len(ps.test),
            "train": len(ps.train),
            "test": len(ps.test),
            "duplicates_dropped": ps.duplicates_dropped,
            "truncated": ps.truncated,
            "per_family": _family_counts(ps.train, ps.test),
            "per_reward": per_reward,
        },
    }


def prepare_prompts(cfg: MarbleConfig, out_dir: Path) -> Path:
    """Validate, mix and split `cfg.data.sources` into `out_dir`; returns the manifest path.

    Raises DataError (file, line and field named) on bad input, before anything is written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: output path exists and is not a directory")
    ps = build_prompt_set(cfg)
    per_reward = applicability_counts(cfg, ps.train, ps.test)
    _check_applicability(per_reward, len(ps.train), len(ps.test))
    with staged_dir(out_dir) as tmp:
        write_prompt_records(tmp / TRAIN_FILE, ps.train)
        write_prompt_records(tmp / TEST_FILE, ps.test)
        manifest = build_manifest(
            cfg, ps, {TRAIN_FILE: tmp / TRAIN_FILE, TEST_FILE: tmp / TEST_FILE}, per_reward
        )
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    counts = manifest["counts"]
    log.info(
        "prepared %d prompts (%d train, %d test) in %s; families %s",
        counts["total"],
        counts["train"],
        counts["test"],
        out_dir,
        {f: c["total"] for f, c in counts["per_family"].items()},
    )
    return out_dir / MANIFEST_FILE


def load_prepared(prompts_dir: Path) -> tuple[list[PromptRecord], list[PromptRecord], dict[str, Any]]:
    """Read a `prepare` output: (train, test, manifest), refusing files that differ from the manifest.

    For stages that want to be sure the prompts are exactly the prepared ones (e.g. evaluation
    recording the data hash); raises DataError naming the file that is missing or was modified.
    """
    prompts_dir = Path(prompts_dir)
    manifest_path = prompts_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path}: not found (run `marble prepare` first)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{manifest_path}: not a prepare manifest ({exc})") from None
    for name in (TRAIN_FILE, TEST_FILE):
        path = prompts_dir / name
        if not path.is_file():
            raise DataError(f"{path}: missing from the prepared prompts")
        digest = file_sha256(path)
        if name not in files or files[name].get("sha256") != digest:
            raise DataError(f"{path}: content differs from {manifest_path} (modified after `marble prepare`)")
    return (
        read_prompt_records(prompts_dir / TRAIN_FILE),
        read_prompt_records(prompts_dir / TEST_FILE),
        manifest,
    )
