"""Which Kubernetes secrets each pipeline task reads, and with which keys.

KFP backends 2.4 / 2.5 (Kubeflow 1.10) ignore `optional` on secret environment variables (honoured
from 2.15): a secret or key that does not exist leaves the pod in CreateContainerConfigError for good.
So a task gets a secret only when the config uses it, and only the keys docs/kubeflow.md tells users
to put in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HF_TOKEN_KEY = "HF_TOKEN"
DVC_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
MLFLOW_TOKEN_KEY = "MLFLOW_TRACKING_TOKEN"
REGISTRY_TASKS = ("gate", "promote", "record-candidate")
"""The tasks that talk to the model registry."""


@dataclass(frozen=True)
class SecretEnv:
    secret: str
    keys: tuple[str, ...]
    """Secret keys, each exposed as the environment variable of the same name."""


def registry_token_key(cfg: Any) -> str:
    """The variable the configured registry backend reads its token from."""
    return cfg.registry.token_env if cfg.registry.kind == "kubeflow" else MLFLOW_TOKEN_KEY


def task_secrets(cfg: Any) -> dict[str, list[SecretEnv]]:
    """Task name -> secrets it reads. Only secrets named in `pipeline:` and needed by the config."""
    p = cfg.pipeline
    out: dict[str, list[SecretEnv]] = {}
    if p.hub_token_secret:  # gated hub models: resolving revisions and downloading snapshots
        hub = SecretEnv(p.hub_token_secret, (HF_TOKEN_KEY,))
        for task in ("fingerprint-inputs", "cache-reward-models"):
            out.setdefault(task, []).append(hub)
    if p.dvc_secret and cfg.data.dvc is not None:
        dvc = SecretEnv(p.dvc_secret, DVC_KEYS)
        for task in ("fingerprint-inputs", "prepare-prompts"):
            out.setdefault(task, []).append(dvc)
    if p.registry_token_secret:  # the gate reads the champion, its two branches register
        for task in REGISTRY_TASKS:
            out[task] = [SecretEnv(p.registry_token_secret, (registry_token_key(cfg),))]
    if p.reward_token_secret and cfg.reward_token_envs:  # the http rewards' bearer tokens, never in URLs
        rewards = SecretEnv(p.reward_token_secret, tuple(cfg.reward_token_envs))
        for task in ("train", "evaluate"):
            out.setdefault(task, []).append(rewards)
    return out


def secret_env_vars(secrets: list[SecretEnv]) -> list[dict[str, Any]]:
    """Kubernetes container `env` entries reading `secrets` (for pods marble creates itself)."""
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": s.secret, "key": key}}}
        for s in secrets
        for key in s.keys
    ]


def unused_secrets(cfg: Any) -> list[str]:
    """Secrets named in the config that no task would read (a compile-time warning)."""
    p, problems = cfg.pipeline, []
    if p.dvc_secret and cfg.data.dvc is None:
        problems.append(f"pipeline.dvc_secret={p.dvc_secret!r} is set but data.dvc is not: nothing reads it")
    embedded = cfg.registry.kind == "mlflow" and (cfg.registry.tracking_uri or "sqlite:").startswith(
        "sqlite:"
    )
    if p.reward_token_secret and not cfg.reward_token_envs:
        problems.append(
            f"pipeline.reward_token_secret={p.reward_token_secret!r} is set but no http reward has a "
            "token_env: nothing reads it"
        )
    if p.registry_token_secret and embedded:
        problems.append(
            f"pipeline.registry_token_secret={p.registry_token_secret!r} is set but the registry is an "
            "embedded sqlite store: nothing reads it"
        )
    return problems
