"""Upstream Kubernetes contracts the tests hold marble's objects to, offline.

- `validate_pytorchjob`: the Training Operator's CRD openAPI schema (vendored fixture), strict like
  `kubectl --validate=strict` (an unknown field is an error, not silently pruned);
- `restricted_violations`: the Pod Security Standards "restricted" profile
  (https://kubernetes.io/docs/concepts/security/pod-security-standards/, v1.32), baseline included.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD = Path(__file__).parent / "fixtures" / "training-operator" / "kubeflow.org_pytorchjobs.yaml"


def _strict(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@cache
def pytorchjob_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def pytorchjob_errors(job: dict[str, Any]) -> list[str]:
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in pytorchjob_validator().iter_errors(job)
    ]
    if job.get("apiVersion") != "kubeflow.org/v1" or job.get("kind") != "PyTorchJob":
        errors.append(f"apiVersion/kind: {job.get('apiVersion')}/{job.get('kind')}")
    return errors


# ------------------------------------------------------------------ Pod Security Standards: restricted
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Violations of the "restricted" profile by a pod spec (empty when it passes)."""
    out: list[str] = []
    psc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            out.append(f"{key} must not be true")
    for vol in pod.get("volumes", []):
        kind = next(k for k in vol if k != "name")
        if kind not in RESTRICTED_VOLUMES:
            out.append(f"volume {vol['name']}: type {kind} not allowed")
    for c in _containers(pod):
        sc, name = c.get("securityContext", {}), c["name"]
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: may add only NET_BIND_SERVICE")
        if not (
            sc.get("runAsNonRoot") is True
            or (psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is None)
        ):
            out.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            out.append(f"{name}: runAsUser must not be 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            out.append(f"{name}: hostPort")
    return out
