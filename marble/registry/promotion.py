"""The promotion decision as its own step, so a pipeline can branch on it.

`decide_promotion` applies the promotion gate to an evaluated adapter against the registry's current
champion WITHOUT writing to the registry: the pipeline's gate task outputs its decision ('champion' or
'candidate') and a `dsl.If` routes the run to the task that promotes or to the one that records a
candidate. Both call `register_adapter`, which decides again under the registry's lock (the champion
may have moved in between: two runs finishing together); `branch_check` says when the branch taken
and the registration disagree.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

from marble.config import KubeflowRegistry, MarbleConfig
from marble.eval.contract import EvalSummary
from marble.registry.base import CANDIDATE, CHAMPION, TAG_APPLIED, TAG_GATE, TAG_GATE_SUMMARY
from marble.registry.register import (
    _check_adapter,
    _decide,
    check_evaluated,
    open_registry,
    run_id,
)

GATE_FILE = "gate.json"


def decide_promotion(
    cfg: MarbleConfig, adapter_dir: Path, eval_dir: Path, registry_dir: Path | None = None
) -> dict[str, Any]:
    """The gate's decision for `adapter_dir` (evaluated in `eval_dir`) against the current champion.

    `registry_dir` is where an embedded store lives (None: a run-local store, which has no champion yet).
    A version already registered for this adapter and run keeps the decision it got (a retried run).
    Returns {'decision', 'passed', 'summary', 'checks', 'champion_before', 'key', 'version'}.
    """
    adapter_dir, eval_dir = Path(adapter_dir), Path(eval_dir)
    _check_adapter(adapter_dir)
    summary = EvalSummary.load(eval_dir / "eval.json")
    key = f"{check_evaluated(summary, adapter_dir, eval_dir)}:{run_id(cfg)}"
    with tempfile.TemporaryDirectory() as tmp:
        registry = open_registry(cfg, Path(registry_dir) if registry_dir else Path(tmp))
        existing = registry.find_versions(key)
        if existing and existing[0].tags.get(TAG_APPLIED) == "true":
            v = existing[0]
            passed = v.tags.get(TAG_GATE) == "passed"
            return _decision(passed, v.tags.get(TAG_GATE_SUMMARY, ""), [], None, key, v.version)
        champion, gate = _decide(cfg, registry, summary)
    checks = gate.to_json_dict()["checks"]
    return _decision(gate.passed, gate.summary(), checks, champion.version if champion else None, key, None)


def _decision(passed, summary, checks, champion_before, key, version) -> dict[str, Any]:
    return {
        "decision": CHAMPION if passed else CANDIDATE,
        "passed": bool(passed),
        "summary": summary,
        "checks": checks,
        "champion_before": champion_before,
        "key": key,
        "version": version,
    }


def registered_alias(record: dict[str, Any]) -> str:
    """The alias a registration record's version got ('champion' when its gate passed)."""
    return CHAMPION if record.get("gate_passed") else CANDIDATE


def branch_check(record: dict[str, Any], expected: str) -> str | None:
    """None when the registration agrees with the branch the pipeline took, else why not."""
    got = registered_alias(record)
    if got == expected:
        return None
    return (
        f"the gate task decided {expected!r} but registration, deciding again under the registry's lock, "
        f"gave {got!r} ({record.get('gate_summary')}): the champion changed in between "
        f"(champion before: {record.get('champion_before')})"
    )


def registry_link(cfg: MarbleConfig, version: str, store: Path | None = None) -> str:
    """Where a user finds registered `version`: the MLflow UI page on a tracking server, else the model
    URI (MLflow; `store` is the embedded store's directory) or the server and names (Kubeflow Model
    Registry)."""
    reg = cfg.registry
    if isinstance(reg, KubeflowRegistry):
        return f"{reg.server_address}:{reg.port} registered model {reg.model_name!r} version {version!r}"
    uri = reg.tracking_uri
    if uri and uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/models/{quote(reg.model_name, safe='')}/versions/{quote(str(version))}"
    where = (
        f"tracking URI {uri}"
        if uri
        else f"embedded store {store}"
        if store
        else "embedded store in the registration artifact"
    )
    return f"models:/{reg.model_name}/{version} ({where})"
