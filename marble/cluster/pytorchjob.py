"""The multi-node training job: a Training Operator v1 PyTorchJob built from the config, submitted
through the Kubernetes API, watched until it finishes, and deleted when the pipeline run stops.

Contract (Training Operator v1.9, the version Kubeflow 1.10 ships): `kubeflow.org/v1` PyTorchJob;
replicas run the `pytorch` container, into which the operator injects PET_NNODES, PET_NPROC_PER_NODE
(from `spec.nprocPerNode`), PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT; pods carry the labels
`training.kubeflow.org/job-name` and `training.kubeflow.org/replica-type` (lower case); the job reports
`status.conditions` of type Created / Running / Restarting / Succeeded / Failed. The schema is
checked against the vendored CRD in tests/fixtures/training-operator/.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from marble.cluster.launch import LaunchPlan
from marble.cluster.secrets import secret_env_vars, task_secrets

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
CONTAINER = "pytorch"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
RUN_ID_LABEL = "marble.ml/run-id"
ISTIO_INJECT = "sidecar.istio.io/inject"


def job_name(run_id: str) -> str:
    """One job per pipeline run: a retried train task finds (and adopts or replaces) its own job."""
    return "marble-train-" + hashlib.sha256(run_id.encode()).hexdigest()[:12]


def label_value(text: str) -> str:
    """`text` as a valid label value (63 chars of [A-Za-z0-9._-], alphanumeric at both ends)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)[:63].strip("-._") or "none"


def restricted_security(run_as_user: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod, container) securityContext passing Pod Security "restricted"."""
    pod = {
        "runAsNonRoot": True,
        "runAsUser": run_as_user,
        "runAsGroup": run_as_user,
        "fsGroup": run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return pod, container


def _resources(cfg: Any) -> dict[str, Any]:
    p, r = cfg.pipeline, cfg.pipeline.resources.train
    limits: dict[str, Any] = {"cpu": r.cpu_limit, "memory": r.memory_limit}
    if p.gpus:
        limits[p.accelerator_type] = p.gpus
    return {"limits": limits, "requests": {"cpu": r.cpu_request, "memory": r.memory_request}}


def pod_template(cfg: Any, plan: LaunchPlan, command: list[str], run_id: str) -> dict[str, Any]:
    """One replica's pod: restricted security, no istio sidecar (it never exits and blocks the
    rendezvous), the cache PVC, a memory-backed /dev/shm, GPU placement from the config."""
    p = cfg.pipeline
    pod_security, container_security = restricted_security(p.run_as_user)
    no_sidecar = {ISTIO_INJECT: "false"}
    spec: dict[str, Any] = {
        "serviceAccountName": p.job_service_account,
        "automountServiceAccountToken": False,
        "securityContext": pod_security,
        "containers": [
            {
                "name": CONTAINER,
                "image": plan.image,
                "command": command,
                "env": [
                    {"name": "HF_HUB_OFFLINE", "value": "1"},  # training reads the verified snapshots only
                    {"name": "PYTHONUNBUFFERED", "value": "1"},
                    {"name": "MARBLE_RUN_ID", "value": run_id},
                    *secret_env_vars(task_secrets(cfg).get("train", [])),  # http rewards' tokens
                ],
                "resources": _resources(cfg),
                "securityContext": container_security,
                "volumeMounts": [
                    {"name": "cache", "mountPath": p.cache_mount},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
            }
        ],
        "volumes": [
            {"name": "cache", "persistentVolumeClaim": {"claimName": p.cache_pvc}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": p.shm_size}},
        ],
    }
    if p.node_selector:
        spec["nodeSelector"] = dict(p.node_selector)
    if p.tolerations:
        spec["tolerations"] = [t.model_dump(exclude_none=True) for t in p.tolerations]
    if p.gang_scheduler:
        spec["schedulerName"] = p.gang_scheduler
    labels = {**no_sidecar, "app.kubernetes.io/part-of": "marble", RUN_ID_LABEL: label_value(run_id)}
    return {"metadata": {"labels": labels, "annotations": dict(no_sidecar)}, "spec": spec}


def build_job(
    cfg: Any, plan: LaunchPlan, *, name: str, namespace: str, run_id: str, command: list[str]
) -> dict[str, Any]:
    """The PyTorchJob of `plan` (kind=pytorchjob): 1 master + (nodes - 1) workers running `command`."""
    p = cfg.pipeline
    template = pod_template(cfg, plan, command, run_id)
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if plan.nodes > 1:
        replicas["Worker"] = {"replicas": plan.nodes - 1, "restartPolicy": "OnFailure", "template": template}
    run_policy: dict[str, Any] = {
        "cleanPodPolicy": "Running",  # frees the GPUs of replicas still running when the job ends
        "backoffLimit": p.train_retries + 1,
        # The job never outlives the train task's deadline, even if the launcher pod is gone.
        "activeDeadlineSeconds": p.resources.train.timeout_s,
        "ttlSecondsAfterFinished": 7 * 24 * 3600,
    }
    if p.gang_scheduler:
        run_policy["schedulingPolicy"] = {"minAvailable": plan.nodes}
    labels = {"app.kubernetes.io/part-of": "marble", RUN_ID_LABEL: label_value(run_id)}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "nprocPerNode": str(plan.procs_per_node),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replicas,
        },
    }
