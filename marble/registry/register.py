"""The register stage, and fetching a registered adapter back by alias.

`register_adapter` (called by `marble.stages.register_adapter`):
1. reads the evaluation (`eval.json`, the typed `marble.eval.contract.EvalSummary`) and checks it
   evaluated THIS adapter (sha256);
2. under the registry's lock, looks the idempotency key '<adapter sha256>:<run id>' up: a version
   whose alias decision was already applied is returned as is (a repeated or concurrent call);
3. otherwise applies the promotion gate against the current champion's metrics, creates the version
   (adapter files + every metric and lineage value as tags), and moves `champion` if the gate passed,
   `candidate` if not. `champion` never moves on a failing gate.
The record is also written to `<out_dir>/registration.json`.

The run id is `MARBLE_RUN_ID` when the orchestrator sets one, else '<run_name>-<config hash>': two
firings of the same scheduled run train the same config, so they share the key and register once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from marble.config import KubeflowRegistry, MarbleConfig
from marble.errors import RegistryError
from marble.eval.contract import EvalSummary, GateResult
from marble.eval.gate import evaluate_gate
from marble.eval.stats import composite_zscores
from marble.io import atomic_write_text, staged_dir
from marble.registry.base import (
    CANDIDATE,
    CHAMPION,
    METRIC_PREFIX,
    TAG_APPLIED,
    TAG_GATE,
    TAG_GATE_SUMMARY,
    TAG_RUN,
    TAG_SHA,
    NewVersion,
    RegisteredVersion,
    Registry,
    adapter_sha256,
)

log = logging.getLogger(__name__)

RUN_ID_ENV = "MARBLE_RUN_ID"
TAG_PROTOCOL = "marble.eval_protocol"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
RECORD_FILE = "registration.json"
EVAL_FILES = ("eval.json", "metrics.json", "report.md", "report.html")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def open_registry(cfg: MarbleConfig, out_dir: Path) -> Registry:
    """The configured backend; the embedded MLflow store lives in `out_dir`."""
    reg = cfg.registry
    if isinstance(reg, KubeflowRegistry):
        from marble.registry.kubeflow_backend import KubeflowModelRegistry

        return KubeflowModelRegistry(reg)
    from marble.registry.mlflow_backend import MlflowRegistry

    return MlflowRegistry(reg.model_name, Path(out_dir), reg.tracking_uri)


def run_id(cfg: MarbleConfig) -> str:
    return os.environ.get(RUN_ID_ENV) or f"{cfg.run_name}-{cfg.config_hash()}"


def _check_adapter(adapter_dir: Path) -> None:
    if not (adapter_dir / ADAPTER_FILE).is_file():
        raise RegistryError(f"{adapter_dir}: no {ADAPTER_FILE}; expected an exported adapter directory")


def check_evaluated(summary: EvalSummary, adapter_dir: Path, eval_dir: Path) -> str:
    """The adapter's sha256, after checking the evaluation in `eval_dir` scored exactly this adapter."""
    sha = adapter_sha256(adapter_dir)
    evaluated = summary.lineage.adapter_sha256
    if evaluated != sha:
        raise RegistryError(
            f"{eval_dir / 'eval.json'}: evaluated adapter sha256 {evaluated} but {adapter_dir} has {sha}; "
            "re-run `marble evaluate` on this adapter"
        )
    return sha


def _tags(summary: EvalSummary, metrics: dict[str, float], sha: str, rid: str) -> dict[str, str]:
    lin = summary.lineage
    rewards = lin.reward_models.model_dump(mode="json")["rewards"]
    tags = {
        TAG_SHA: sha,
        TAG_RUN: rid,
        "marble.run_name": lin.run_name,
        "marble.git_commit": lin.git_commit,
        "marble.config_hash": lin.config_hash,
        TAG_PROTOCOL: lin.eval_protocol,
        "marble.data_hash": str(lin.data_hash),
        "marble.test_jsonl_sha256": str(lin.test_jsonl_sha256),
        "marble.base_model": lin.base_model,
        "marble.base_model_revision": str(lin.base_model_revision),
        "marble.reward_manifest_sha256": str(lin.reward_models.manifest_sha256),
        "marble.model_lock_sha256": str(lin.reward_models.model_lock_sha256),
        "marble.reward_models": json.dumps(rewards, sort_keys=True, separators=(",", ":")),
    }
    tags.update({METRIC_PREFIX + k: repr(v) for k, v in metrics.items()})
    return tags


def register_adapter(
    cfg: MarbleConfig, adapter_dir: Path, eval_dir: Path, out_dir: Path, registry_dir: Path | None = None
) -> dict[str, Any]:
    """Register `adapter_dir` with the evaluation in `eval_dir`; see the module docstring. An embedded
    store lives in `registry_dir` (default `out_dir`)."""
    adapter_dir, eval_dir, out_dir = Path(adapter_dir), Path(eval_dir), Path(out_dir)
    _check_adapter(adapter_dir)
    summary = EvalSummary.load(eval_dir / "eval.json")
    metrics = {k: v for k, v in summary.flat_metrics().items() if v is not None}
    sha = check_evaluated(summary, adapter_dir, eval_dir)
    rid = run_id(cfg)
    key = f"{sha}:{rid}"
    registry = open_registry(cfg, Path(registry_dir) if registry_dir else out_dir)
    with registry.lock():
        record = _register_locked(cfg, registry, adapter_dir, eval_dir, summary, metrics, sha, rid, key)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / RECORD_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def _register_locked(
    cfg: MarbleConfig,
    registry: Registry,
    adapter_dir: Path,
    eval_dir: Path,
    summary: EvalSummary,
    metrics: dict[str, float],
    sha: str,
    rid: str,
    key: str,
) -> dict[str, Any]:
    existing = registry.find_versions(key)
    if existing and existing[0].tags.get(TAG_APPLIED) == "true":
        v = existing[0]
        log.info("adapter %s (run %s) is already version %s; nothing to do", sha[:12], rid, v.version)
        return _record(registry, v, key, created=False, champion_before=None, gate=None)

    champion, gate = _decide(cfg, registry, summary)
    tags = {**_tags(summary, metrics, sha, rid), **_gate_tags(gate)}
    created = not existing
    if existing:  # created earlier, but the alias step never finished (a crash): redo the decision
        version = existing[0]
        registry.set_tags(version.version, _gate_tags(gate))
    else:
        extra = [eval_dir / f for f in EVAL_FILES if (eval_dir / f).is_file()]
        version = registry.create_version(NewVersion(adapter_dir, key, tags, metrics, extra))
        # A racing writer on a shared server may have registered the same key: the oldest version wins.
        same = registry.find_versions(key)
        if same and same[0].version != version.version:
            log.info("lost a registration race for %s; keeping version %s", key, same[0].version)
            registry.delete_version(version.version)
            version, created = same[0], False
    champion, gate = _apply_decision(cfg, registry, summary, version.version, champion, gate)
    registry.set_tags(version.version, {TAG_APPLIED: "true"})
    record = _record(
        registry, version, key, created=created, champion_before=_name(champion), gate=gate
    )  # fmt: skip
    return {**record, "composite": composite_with_champion(summary, champion)}


PROMOTION_ATTEMPTS = 5


def _decide(
    cfg: MarbleConfig, registry: Registry, summary: EvalSummary
) -> tuple[RegisteredVersion | None, GateResult]:
    """The current champion and the gate's verdict on this evaluation against it."""
    champion = registry.get_alias(CHAMPION)
    return champion, evaluate_gate(summary, cfg.eval.gate, **_champion_for_gate(summary, champion))


def _apply_decision(
    cfg: MarbleConfig,
    registry: Registry,
    summary: EvalSummary,
    version: str,
    champion: RegisteredVersion | None,
    gate: GateResult,
) -> tuple[RegisteredVersion | None, GateResult]:
    """Move `candidate`, or `champion` by compare-and-set: a run that passed the gate against
    champion A promotes only while A is still the champion. Two runs finishing together on a shared
    server (no registry-wide lock) would otherwise both pass against A and the last writer would win
    without ever being compared with the other; here the later one decides again against the new
    champion. Returns the champion and gate the final decision used."""
    for _ in range(PROMOTION_ATTEMPTS):
        if not gate.passed:
            registry.set_alias(CANDIDATE, version)
            break
        if promote_if_unchanged(registry, version, _name(champion)):
            break
        moved_to, old = registry.get_alias(CHAMPION), _name(champion)
        log.warning("champion moved from %s to %s while deciding; deciding again", old, _name(moved_to))
        champion, gate = _decide(cfg, registry, summary)
        registry.set_tags(version, _gate_tags(gate))
    else:
        raise RegistryError(
            f"version {version}: the champion moved {PROMOTION_ATTEMPTS} times while this run decided; "
            "nothing was promoted, run `marble register` again"
        )
    log.info(
        "version %s: gate %s -> alias %s", version, gate.summary(), CHAMPION if gate.passed else CANDIDATE
    )
    return champion, gate


def promote_if_unchanged(registry: Registry, version: str, expected: str | None) -> bool:
    """Compare-and-set of the champion alias: point it at `version` only if it still points at
    `expected` (None: no champion yet). Returns False, changing nothing, if it moved.

    Under the embedded store's file lock this is atomic. A shared server offers no conditional
    update, so the re-read narrows the window to one request; the change is read back, and a lost
    race (another writer's value there) also returns False."""
    if _name(registry.get_alias(CHAMPION)) != expected:
        return False
    registry.set_alias(CHAMPION, version)
    return _name(registry.get_alias(CHAMPION)) == version


def _name(version: RegisteredVersion | None) -> str | None:
    return version.version if version is not None else None


def _gate_tags(gate: GateResult) -> dict[str, str]:
    return {TAG_GATE: "passed" if gate.passed else "failed", TAG_GATE_SUMMARY: gate.summary()}


def composite_with_champion(
    summary: EvalSummary, champion: RegisteredVersion | None
) -> dict[str, Any] | None:
    """The paper's composite (mean z-score, population std) over base, champion and this adapter, on
    the rewards all three were measured on; None without a champion."""
    if champion is None:
        return None
    theirs = champion.reward_means()
    rewards = summary.rewards
    names = [
        n
        for n, r in rewards.items()
        if n in theirs and all(math.isfinite(float(x)) for x in (r.base.mean, r.adapter.mean, theirs[n]))
    ]
    if not names:
        return None
    table = np.array(
        [
            [rewards[n].base.mean for n in names],
            [theirs[n] for n in names],
            [rewards[n].adapter.mean for n in names],
        ]
    )  # [3, K]
    z = composite_zscores(table)  # [3]
    labels = ["base", f"champion v{champion.version}", "this adapter"]
    return {"rewards": names, "scores": dict(zip(labels, z.tolist(), strict=True))}


def _champion_for_gate(summary: EvalSummary, champion: RegisteredVersion | None) -> dict[str, Any]:
    """The champion's per-reward means, only if it was measured the same way (same eval protocol:
    data, sampling, seeds, rewards). Numbers from another protocol are not comparable; the Pareto
    check is then skipped and says why (re-evaluate the champion under the new protocol to compare)."""
    if champion is None:
        return {"champion": None, "champion_label": ""}
    mine = summary.lineage.eval_protocol
    theirs = champion.tags.get(TAG_PROTOCOL)
    if mine != theirs:
        note = (
            f"champion version {champion.version} was evaluated under eval protocol {theirs}, this adapter "
            f"under {mine}: not comparable, Pareto check skipped"
        )
        log.warning(note)
        return {"champion": None, "champion_label": note}
    return {"champion": champion.reward_means(), "champion_label": f"version {champion.version}"}


def _record(
    registry: Registry,
    version: RegisteredVersion,
    key: str,
    *,
    created: bool,
    champion_before: str | None,
    gate: GateResult | None,
) -> dict[str, Any]:
    champion = registry.get_alias(CHAMPION)
    candidate = registry.get_alias(CANDIDATE)
    return {
        "backend": registry.backend,
        "registry": repr(registry),
        "model_name": registry.model_name,
        "version": version.version,
        "source": version.source,
        "key": key,
        "created": created,
        "gate_passed": version.tags.get(TAG_GATE) == "passed" if gate is None else gate.passed,
        "gate_summary": version.tags.get(TAG_GATE_SUMMARY) if gate is None else gate.summary(),
        "gate": gate.to_json_dict() if gate is not None else None,
        "champion_before": champion_before,
        "champion": champion.version if champion else None,
        "candidate": candidate.version if candidate else None,
    }


# ------------------------------------------------------------------------------------- fetching
def fetch_adapter(
    cfg: MarbleConfig, registry_dir: Path, alias: str = CHAMPION, dst: Path | None = None
) -> tuple[Path, RegisteredVersion]:
    """Download the adapter `alias` points to and verify its sha256 against the registered one.

    The registry server is trusted with who may register, not with the bytes or names it hands back:
    a version without a valid sha256 tag is refused (it cannot be verified), the download lands in a
    staging directory and becomes `dst` only once verified, links in it are refused, and the default
    `dst` is named by the alias and the verified hash, never by a server-provided version name.
    Returns (directory holding pytorch_lora_weights.safetensors, the version).
    """
    if not SAFE_NAME.fullmatch(alias):
        raise RegistryError(f"alias {alias!r}: expected letters, digits, '.', '_' or '-' (e.g. {CHAMPION})")
    registry = open_registry(cfg, Path(registry_dir))
    version = registry.get_alias(alias)
    if version is None:
        raise RegistryError(
            f"{registry!r}: no version has the alias {alias!r} yet (no registration has set it)"
        )
    want = version.tags.get(TAG_SHA, "")
    if not SHA256_HEX.fullmatch(want):
        raise RegistryError(
            f"version {version.version!r} ({alias}): tag {TAG_SHA} is {want or 'missing'!r}, not a sha256; "
            "an adapter that cannot be verified is not fetched (register it again with `marble register`)"
        )
    dst = Path(dst) if dst is not None else Path(registry_dir) / "fetched" / f"{alias}-{want[:16]}"
    with staged_dir(dst) as tmp:
        registry.download(version, tmp)
        relative = _verified_adapter(tmp, want, version.version)
    return dst / relative, version


def _verified_adapter(root: Path, want: str, version: str) -> Path:
    """The one adapter directory under `root` (relative), after checking it holds no link and its
    weights hash to `want`."""
    links = [p for p in root.rglob("*") if p.is_symlink()]
    if links:
        raise RegistryError(f"version {version!r}: the download holds links ({links[0].name}); refused")
    found = [p.parent for p in root.rglob(ADAPTER_FILE)]
    if len(found) != 1:
        raise RegistryError(
            f"version {version!r}: expected one {ADAPTER_FILE} in the download, found {len(found)}"
        )
    got = adapter_sha256(found[0])
    if got != want:
        raise RegistryError(f"version {version!r}: downloaded adapter sha256 {got} != registered {want}")
    return found[0].relative_to(root)


def load_registered_pipeline(
    cfg: MarbleConfig,
    registry_dir: Path,
    alias: str = CHAMPION,
    *,
    device: str = "cpu",
    dst: Path | None = None,
    model_cache: Path | None = None,
    lock=None,
):
    """A stock diffusers SD3 pipeline (the configured base) with the `alias` adapter loaded.

    Uses only `load_pipeline` + diffusers' own `pipe.load_lora_weights` (through the models package's
    check that the load attached LoRA layers), as a serving user would. `model_cache` is a reward cache
    directory holding the base model snapshot, if any; `lock` the model lock the base model must match.
    """
    from marble.model_cache import run_hub
    from marble.models.loading import load_pipeline
    from marble.models.lora import load_adapter_into_pipeline

    adapter, version = fetch_adapter(cfg, registry_dir, alias, dst)
    pipe = load_pipeline(cfg.model, device=device, hub=run_hub(cfg, cache_dir=model_cache, lock=lock))
    load_adapter_into_pipeline(pipe, adapter, adapter_name=f"marble_v{version.version}")
    return pipe
