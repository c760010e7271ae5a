"""Kubernetes settings of the pipeline's tasks, in one place: requests and limits, deadline, security
context, GPU placement, /dev/shm, the cache PVC, secrets and retries.

What Kubeflow 1.10's backends (KFP 2.4.1 / 2.5.0) apply from these, read in their driver
(backend/src/v2/driver/driver.go) and Argo compiler: CPU/memory requests and limits, accelerators,
node selector, tolerations, PVC mounts, emptyDir mounts, secrets as env (WITHOUT `optional`), field
paths as env, `activeDeadlineSeconds` (set_timeout) and the retry policy with its max duration. They
ignore the per-task security context (applied by backends from 2.15 on): docs/kubeflow.md says what
that leaves to the cluster.
"""

from __future__ import annotations

from kfp import dsl, kubernetes

from marble.cluster.secrets import SecretEnv
from marble.config import PipelineConfig, TaskResources

SHM_VOLUME = "dshm"


def with_resources(task: dsl.PipelineTask, r: TaskResources) -> dsl.PipelineTask:
    """Requests, limits and the pod's active deadline (profile quotas refuse pods without them)."""
    task.set_cpu_request(r.cpu_request).set_cpu_limit(r.cpu_limit)
    task.set_memory_request(r.memory_request).set_memory_limit(r.memory_limit)
    return kubernetes.set_timeout(task, r.timeout_s)


def with_security(task: dsl.PipelineTask, k8s: PipelineConfig) -> dsl.PipelineTask:
    """Non-root identity (the images' user); backends >= 2.15 add no-escalation, drop ALL, seccomp."""
    return kubernetes.set_security_context(
        task, run_as_user=k8s.run_as_user, run_as_group=k8s.run_as_user, run_as_non_root=True
    )


def on_gpu_nodes(task: dsl.PipelineTask, k8s: PipelineConfig) -> dsl.PipelineTask:
    """Accelerators, node selector, tolerations and a memory-backed /dev/shm of a GPU task."""
    if k8s.gpus:
        task.set_accelerator_type(k8s.accelerator_type).set_accelerator_limit(k8s.gpus)
    for key, value in sorted(k8s.node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in k8s.tolerations:
        kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    return kubernetes.empty_dir_mount(
        task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory", size_limit=k8s.shm_size
    )


def with_cache_volume(task: dsl.PipelineTask, k8s: PipelineConfig) -> dsl.PipelineTask:
    """Mount the cache PVC (snapshots, checkpoints, the registry store) at `k8s.cache_mount`."""
    return kubernetes.mount_pvc(task, pvc_name=k8s.cache_pvc, mount_path=k8s.cache_mount)


def with_secrets(task: dsl.PipelineTask, secrets: list[SecretEnv]) -> dsl.PipelineTask:
    """Secret keys as environment variables, never optional (KFP 2.4/2.5 ignore `optional`)."""
    for s in secrets:
        kubernetes.use_secret_as_env(task, secret_name=s.secret, secret_key_to_env={k: k for k in s.keys})
    return task


def with_namespace_env(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """POD_NAMESPACE: where the launcher creates (and the exit handler deletes) the PyTorchJob."""
    return kubernetes.use_field_path_as_env(task, env_name="POD_NAMESPACE", field_path="metadata.namespace")


def retry_max_duration_s(k8s: PipelineConfig, timeout_s: int) -> int:
    """Argo's retry `maxDuration` counts from the first attempt and cuts a retried pod short at it
    (kfp's default is 3600 s): it must cover every attempt running to its deadline plus the backoffs."""
    attempts = k8s.train_retries + 1
    backoffs = sum(k8s.retry_backoff_s * 2**i for i in range(k8s.train_retries))
    return attempts * timeout_s + backoffs


def with_retries(task: dsl.PipelineTask, k8s: PipelineConfig, timeout_s: int) -> dsl.PipelineTask:
    return task.set_retry(
        num_retries=k8s.train_retries,
        backoff_duration=f"{k8s.retry_backoff_s}s",
        backoff_factor=2.0,
        backoff_max_duration=f"{retry_max_duration_s(k8s, timeout_s)}s",
    )
