"""The few Kubernetes API calls the launcher makes, through the official `kubernetes` client.

Credentials: the pod's service account inside a cluster (`load_incluster_config`), else the user's
kubeconfig (`KUBECONFIG` or ~/.kube/config). Namespace: `POD_NAMESPACE` (the pipeline sets it from the
pod's own namespace), else the service account's namespace file.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from marble.cluster.pytorchjob import CONTAINER, GROUP, JOB_NAME_LABEL, PLURAL, REPLICA_TYPE_LABEL, VERSION
from marble.errors import MarbleError

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubeApiError(MarbleError):
    """The Kubernetes API refused or failed a request; the message names the call and the reason."""


def current_namespace() -> str:
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    if SA_NAMESPACE_FILE.is_file():
        return SA_NAMESPACE_FILE.read_text().strip()
    raise KubeApiError("cannot tell the namespace: set POD_NAMESPACE (the pipeline sets it for its tasks)")


def api_client() -> Any:
    from kubernetes import client, config

    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.ApiClient()


class JobApi:
    """Create / read / delete PyTorchJobs and read their master's log in one namespace."""

    def __init__(self, namespace: str, client: Any | None = None) -> None:
        from kubernetes import client as k8s

        self.namespace = namespace
        self._api = client or api_client()
        self._custom = k8s.CustomObjectsApi(self._api)
        self._core = k8s.CoreV1Api(self._api)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KubeApiError(
                f"Kubernetes API: {what} in namespace {self.namespace} failed: {exc.status} {exc.reason}: "
                f"{(exc.body or '')[:500]}"
            ) from None

    def create(self, job: dict[str, Any]) -> dict[str, Any]:
        return self._call(
            f"create PyTorchJob {job['metadata']['name']}",
            self._custom.create_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, job,
        )  # fmt: skip

    def get(self, name: str) -> dict[str, Any] | None:
        return self._call(
            f"get PyTorchJob {name}",
            self._custom.get_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, name,
        )  # fmt: skip

    def delete(self, name: str) -> None:
        self._call(
            f"delete PyTorchJob {name}",
            self._custom.delete_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, name,
            propagation_policy="Background",
        )  # fmt: skip

    def list_by_label(self, selector: str) -> list[dict[str, Any]]:
        found = self._call(
            f"list PyTorchJobs ({selector})",
            self._custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
            label_selector=selector,
        )  # fmt: skip
        return list((found or {}).get("items", []))

    def master_log(self, name: str, since_s: int) -> list[tuple[datetime, str]]:
        """Recent log lines of the job's master pod(s), as (timestamp, text); [] before a pod runs."""
        selector = f"{JOB_NAME_LABEL}={name},{REPLICA_TYPE_LABEL}=master"
        pods = self._call(
            "list the master pod", self._core.list_namespaced_pod, self.namespace, label_selector=selector
        )
        lines: list[tuple[datetime, str]] = []
        for pod in pods.items if pods else []:
            try:
                text = self._core.read_namespaced_pod_log(
                    pod.metadata.name,
                    self.namespace,
                    container=CONTAINER,
                    timestamps=True,
                    since_seconds=since_s,
                )
            except Exception:  # a pod that is still being created has no log yet
                continue
            lines += [_stamped(line) for line in (text or "").splitlines() if line.strip()]
        return sorted(lines, key=lambda item: item[0])


def _stamped(line: str) -> tuple[datetime, str]:
    stamp, _, text = line.partition(" ")
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")), text
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc), line
