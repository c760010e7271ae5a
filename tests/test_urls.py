"""Credentials in URLs: refused at validation with a pointer to the secret-based setting, redacted in
every message, and the http rewards' tokens reach their tasks from a Kubernetes secret."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from marble.cli import main
from marble.configio import ConfigError, apply_overrides, read_config_dict, validate_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
PASSWORD = "hunter2pw"


def _with(field: str, url: str) -> dict:
    data = read_config_dict(TINY)
    if field == "reward":
        data["rewards"].append({"kind": "http", "name": "remote", "url": url, "held_out": True})
    elif field == "tracking_uri":
        data["registry"] = {"kind": "mlflow", "tracking_uri": url}
    else:
        data["registry"] = {"kind": "kubeflow", "server_address": url, "is_secure": url.startswith("https")}
    return data


APPENDED_REWARD_URL = f"rewards.{len(read_config_dict(TINY)['rewards'])}.http.url"  # `_with` appends it

CREDENTIALED = [
    ("reward", f"https://scorer:{PASSWORD}@scorer.example/score", APPENDED_REWARD_URL, "token_env"),
    ("reward", f"https://scorer.example/score?api_key={PASSWORD}", APPENDED_REWARD_URL, "token_env"),
    ("reward", f"http://{PASSWORD}@scorer.example/score", APPENDED_REWARD_URL, "reward_token_secret"),
    ("tracking_uri", f"https://admin:{PASSWORD}@mlflow.example", "registry.mlflow.tracking_uri",
     "MLFLOW_TRACKING_TOKEN"),
    ("tracking_uri", f"postgresql://mlflow:{PASSWORD}@db:5432/mlflow", "registry.mlflow.tracking_uri",
     "PGPASSWORD"),
    ("tracking_uri", f"https://mlflow.example/?access_token={PASSWORD}", "registry.mlflow.tracking_uri",
     "registry_token_secret"),
    ("server_address", f"https://u:{PASSWORD}@model-registry.kubeflow.svc", "registry.kubeflow.server_address",
     "registry_token_secret"),
    ("server_address", f"https://model-registry.kubeflow.svc?X-Amz-Signature={PASSWORD}",
     "registry.kubeflow.server_address", "registry.token_env"),
]  # fmt: skip


@pytest.mark.parametrize(("field", "url", "path", "pointer"), CREDENTIALED)
def test_credentials_in_urls_are_refused_with_the_secret_setting_and_never_echoed(field, url, path, pointer):
    with pytest.raises(ConfigError) as err:
        validate_config(_with(field, url), "cluster.yaml")
    msg = str(err.value)
    assert path in msg and "carries credentials" in msg and pointer in msg, msg
    assert PASSWORD not in msg and "***" in msg


def test_the_cli_refuses_a_credentialed_url_without_printing_it(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_with("tracking_uri", f"https://admin:{PASSWORD}@mlflow.example")))
    assert main(["config", "validate", str(bad)]) == 2
    captured = capsys.readouterr()
    assert "tracking_uri" in captured.err and PASSWORD not in captured.err + captured.out


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("reward", "https://scorer.example:8443/v1/score?model=v2&batch=8"),
        ("reward", "http://reward-server.marble.svc.cluster.local/score"),
        ("tracking_uri", "sqlite:////mnt/marble-cache/registry/mlflow.db"),
        ("tracking_uri", "http://mlflow.mlflow.svc:5000"),
        ("tracking_uri", "postgresql://db:5432/mlflow"),
        ("server_address", "https://model-registry-service.kubeflow.svc.cluster.local"),
    ],
)
def test_plain_urls_are_accepted(field, url):
    validate_config(_with(field, url))


def test_redaction_hides_user_info_and_secret_query_values_only():
    from marble.urls import redact_text, redact_url, url_credentials

    assert (
        redact_url("https://u:pw@h.example:8/p?model=v2&token=abc")
        == "https://***@h.example:8/p?model=v2&token=***"
    )
    assert redact_url("https://h.example/p?model=v2") == "https://h.example/p?model=v2"  # untouched
    assert url_credentials("https://h/p?X-Amz-Signature=1&sig=2&apiKey=3&model=4") == [
        "query parameter 'X-Amz-Signature'",
        "query parameter 'sig'",
        "query parameter 'apiKey'",
    ]
    text = "POST to https://bot:pw@h.example/score failed; retry http://h2/x?password=p"
    assert redact_text(text) == "POST to https://***@h.example/score failed; retry http://h2/x?password=***"


def test_a_presigned_adapter_uri_is_not_recorded_in_the_registry(tmp_path, monkeypatch):
    from _registry_helpers import make_adapter
    from test_registry_kubeflow import FakeModelRegistryClient, kf_config

    from marble.errors import RegistryError
    from marble.registry.base import NewVersion
    from marble.registry.kubeflow_backend import KubeflowModelRegistry

    monkeypatch.setenv("TEST_MR_TOKEN", "t")
    monkeypatch.setenv("MARBLE_ADAPTER_URI", f"s3://bucket/adapter?X-Amz-Signature={PASSWORD}")
    fake = FakeModelRegistryClient()
    reg = KubeflowModelRegistry(kf_config(tmp_path).registry, client_factory=lambda c, t: fake)
    with pytest.raises(RegistryError, match="MARBLE_ADAPTER_URI=.*carries credentials") as err:
        reg.create_version(NewVersion(make_adapter(tmp_path, b"w"), "k:r"))
    assert PASSWORD not in str(err.value) and fake.versions == {}


def test_a_credentialed_kfp_host_is_refused_before_anything_is_sent():
    from pipelines.kfp_server import ClusterError, check_host

    with pytest.raises(ClusterError, match="KFP_TOKEN") as err:
        check_host(f"https://admin:{PASSWORD}@kubeflow.example/pipeline")
    assert PASSWORD not in str(err.value)
    assert check_host("https://kubeflow.example/pipeline") == "https://kubeflow.example/pipeline"


def _with_http_token(*overrides: str):
    data = copy.deepcopy(read_config_dict(TINY))
    data["rewards"].append(
        {"kind": "http", "name": "remote", "url": "https://s.example/score", "token_env": "REMOTE_TOKEN"}
    )
    return validate_config(apply_overrides(data, list(overrides)))


def test_http_reward_tokens_reach_train_and_evaluate_from_the_reward_token_secret(tmp_path):
    from marble.cluster.launch import plan_launch
    from marble.cluster.pytorchjob import build_job
    from pipelines.marble_pipeline import compile_pipeline

    cfg = _with_http_token("pipeline.reward_token_secret=marble-reward-token")
    out = compile_pipeline(cfg, tmp_path / "pipeline.yaml")
    _, platform = yaml.safe_load_all(out.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    injected = {
        task: s["keyToEnv"]
        for task, ex in executors.items()
        for s in ex.get("secretAsEnv", [])
        if s["secretName"] == "marble-reward-token"
    }
    expected = [{"secretKey": "REMOTE_TOKEN", "envVar": "REMOTE_TOKEN"}]
    assert injected == {"exec-train": expected, "exec-evaluate": expected}
    # Multi-node training runs in PyTorchJob pods that marble creates: they read the same key.
    data = read_config_dict(REPO / "configs" / "sd35m-marble.yaml")
    data["rewards"].append(
        {"kind": "http", "name": "remote", "url": "https://s.example/score", "token_env": "REMOTE_TOKEN"}
    )
    overrides = [
        "pipeline.nodes=3",
        "pipeline.gpus=8",
        "pipeline.cache_access_mode=ReadWriteMany",
        "data.root=/d",
        "pipeline.reward_token_secret=marble-reward-token",
    ]
    multi = validate_config(apply_overrides(data, overrides))
    plan = plan_launch(multi, image="marble-cuda")
    job = build_job(multi, plan, name="j", namespace="ns", run_id="r", command=["torchrun"])
    env = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]
    assert {
        "name": "REMOTE_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "marble-reward-token", "key": "REMOTE_TOKEN"}},
    } in env


def test_a_reward_token_without_its_secret_is_refused_at_compile_time(tmp_path):
    from pipelines.marble_pipeline import compile_pipeline

    with pytest.raises(ConfigError, match="REMOTE_TOKEN.*pipeline.reward_token_secret is null"):
        compile_pipeline(_with_http_token(), tmp_path / "pipeline.yaml")
