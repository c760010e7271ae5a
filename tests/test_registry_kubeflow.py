"""Kubeflow Model Registry backend: request construction against a fake client, and clear errors."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from _registry_helpers import make_adapter, make_eval

from marble.config import KubeflowRegistry
from marble.configio import load_config
from marble.errors import RegistryError
from marble.registry.base import NewVersion, adapter_sha256
from marble.registry.kubeflow_backend import KubeflowModelRegistry, version_name
from marble.registry.register import fetch_adapter, register_adapter

REPO = Path(__file__).resolve().parents[1]


class FakeModelRegistryClient:
    """The subset of `model_registry.ModelRegistry` marble calls, in memory, recording every request."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.models: dict[str, SimpleNamespace] = {}
        self.versions: dict[tuple[str, str], SimpleNamespace] = {}
        self.artifacts: dict[tuple[str, str], SimpleNamespace] = {}

    def register_model(self, name, uri, *, model_format_name, model_format_version, version, **kw):
        self.calls.append(("register_model", (name, uri), dict(kw, version=version, fmt=model_format_name)))
        if (name, version) in self.versions:
            raise RuntimeError(
                f"Version {version} already exists"
            )  # what the real client raises (StoreError)
        rm = self.models.setdefault(
            name, SimpleNamespace(id=str(len(self.models) + 1), name=name, custom_properties={})
        )
        self.versions[(name, version)] = SimpleNamespace(name=version, custom_properties=dict(kw["metadata"]))
        self.artifacts[(name, version)] = SimpleNamespace(uri=uri, model_format_name=model_format_name)
        return rm

    def get_registered_model(self, name):
        self.calls.append(("get_registered_model", (name,), {}))
        return self.models.get(name)

    def get_model_version(self, name, version):
        self.calls.append(("get_model_version", (name, version), {}))
        return self.versions.get((name, version))

    def get_model_artifact(self, name, version):
        return self.artifacts.get((name, version))

    def update(self, obj):
        self.calls.append(("update", (obj.name,), {"custom_properties": dict(obj.custom_properties)}))
        return obj


def kf_config(tmp_path: Path, **reg):
    cfg = load_config(REPO / "configs/tiny.yaml")
    reg = {"port": 443, "is_secure": True, **reg}
    return cfg.model_copy(
        update={
            "registry": KubeflowRegistry(
                server_address="https://mr.example.svc", token_env="TEST_MR_TOKEN", **reg
            )
        }
    )


def test_register_builds_the_right_requests_and_is_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_MR_TOKEN", "s3cr3t")
    monkeypatch.setenv("MARBLE_RUN_ID", "run-7")
    fake = FakeModelRegistryClient()
    seen = {}

    def factory(reg_cfg, token):
        seen.update(address=reg_cfg.server_address, port=reg_cfg.port, token=token, author=reg_cfg.author)
        return fake

    monkeypatch.setattr("marble.registry.kubeflow_backend.default_client_factory", factory)
    cfg = kf_config(tmp_path)
    ad = make_adapter(tmp_path, b"kf-adapter")
    ev = make_eval(tmp_path, ad, {"brightness": 0.6, "colorfulness": 0.3})

    rec = register_adapter(cfg, ad, ev, tmp_path / "reg")
    assert seen == {"address": "https://mr.example.svc", "port": 443, "token": "s3cr3t", "author": "marble"}
    reg_calls = [c for c in fake.calls if c[0] == "register_model"]
    assert len(reg_calls) == 1
    _, (name, uri), kw = reg_calls[0]
    assert name == "marble-lora" and uri == ad.resolve().as_uri() and kw["fmt"] == "diffusers-lora"
    assert kw["version"] == version_name(rec["key"]) and kw["version"].endswith("-run-7")
    meta = kw["metadata"]
    assert meta["marble.run_id"] == "run-7" and meta["metric.adapter/brightness"] == 0.6
    assert meta["marble.config_hash"] == "c0ffee"
    # champion alias is a custom property of the registered model holding the version name
    assert fake.models["marble-lora"].custom_properties["alias.champion"] == kw["version"]
    assert rec["champion"] == rec["version"] and rec["backend"] == "kubeflow" and rec["created"]

    again = register_adapter(cfg, ad, ev, tmp_path / "reg")
    assert not again["created"] and again["version"] == rec["version"]
    assert len([c for c in fake.calls if c[0] == "register_model"]) == 1

    # fetch by alias from a file:// URI (a shared volume)
    path, version = fetch_adapter(cfg, tmp_path / "reg", "champion", tmp_path / "fetched")
    assert (path / "pytorch_lora_weights.safetensors").read_bytes() == b"kf-adapter"
    assert json.loads((tmp_path / "reg" / "registration.json").read_text())["version"] == version.version


def test_a_concurrent_duplicate_returns_the_existing_version(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_MR_TOKEN", "t")
    fake = FakeModelRegistryClient()
    reg = KubeflowModelRegistry(kf_config(tmp_path).registry, client_factory=lambda c, t: fake)
    (tmp_path / "a").mkdir()
    v1 = reg.create_version(NewVersion(tmp_path / "a", "ab" * 32 + ":r", metrics={"x": 1.0}))
    v2 = reg.create_version(NewVersion(tmp_path / "a", "ab" * 32 + ":r", metrics={"x": 1.0}))
    assert v1.version == v2.version and len(fake.versions) == 1


def test_missing_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_MR_TOKEN", "t")

    def unreachable(cfg, token):
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    reg = KubeflowModelRegistry(kf_config(tmp_path, port=8443).registry, client_factory=unreachable)
    with pytest.raises(
        RegistryError, match=r"cannot reach the Kubeflow Model Registry at https://mr.example.svc:8443"
    ):
        reg.get_alias("champion")


def test_missing_token_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("TEST_MR_TOKEN", raising=False)
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    reg = KubeflowModelRegistry(
        kf_config(tmp_path).registry, client_factory=lambda c, t: FakeModelRegistryClient()
    )
    with pytest.raises(RegistryError, match="TEST_MR_TOKEN is empty or unset"):
        reg.get_alias("champion")
    # in a KFP pod the client reads the service-account token file itself: no token passed, no error
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "token"))
    seen = []
    reg = KubeflowModelRegistry(
        kf_config(tmp_path).registry, client_factory=lambda c, t: seen.append(t) or FakeModelRegistryClient()
    )
    assert reg.get_alias("champion") is None and seen == [None]


def test_missing_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_MR_TOKEN", "t")
    real_import = builtins.__import__

    def no_model_registry(name, *args, **kwargs):
        if name == "model_registry" or name.startswith("model_registry."):
            raise ImportError("No module named 'model_registry'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_model_registry)
    reg = KubeflowModelRegistry(kf_config(tmp_path).registry)
    with pytest.raises(RegistryError, match=r"pip install 'marble\[kubeflow-registry\]'"):
        reg.find_versions("k:r")


def test_non_file_uri_cannot_be_fetched(tmp_path, monkeypatch):
    from marble.registry.base import RegisteredVersion

    reg = KubeflowModelRegistry(
        kf_config(tmp_path).registry, client_factory=lambda c, t: FakeModelRegistryClient()
    )
    with pytest.raises(RegistryError, match="only file://"):
        reg.download(RegisteredVersion("m", "v", "s3://bucket/adapter"), tmp_path / "x")


def test_the_real_client_against_a_closed_port_is_a_clear_error(tmp_path, monkeypatch):
    # The actual `model-registry` client (optional extra) contacting nothing: a RegistryError that
    # names the address, not an aiohttp traceback.
    pytest.importorskip("model_registry")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    reg_cfg = KubeflowRegistry(
        server_address="http://127.0.0.1", port=port, is_secure=False, token_env="UNSET_MR_TOKEN"
    )
    monkeypatch.delenv("UNSET_MR_TOKEN", raising=False)
    with pytest.raises(
        RegistryError, match=rf"cannot reach the Kubeflow Model Registry at http://127.0.0.1:{port}"
    ):
        KubeflowModelRegistry(reg_cfg).find_versions("k:r")


def test_defaults_reach_the_in_cluster_model_registry_of_kubeflow_1_10():
    """kubeflow/manifests v1.10.x applications/model-registry: Service model-registry-service in the
    kubeflow namespace, REST port 8080 (appProtocol http), no TLS inside the cluster."""
    reg = KubeflowRegistry()
    assert reg.server_address == "http://model-registry-service.kubeflow.svc.cluster.local"
    assert (reg.port, reg.is_secure) == (8080, False)
    with pytest.raises(ValueError, match="is_secure"):
        KubeflowRegistry(server_address="https://mr.example.com", is_secure=False)


def test_two_runs_passing_the_gate_together_do_not_both_become_champion(tmp_path, monkeypatch):
    # Run B decides against "no champion"; before it promotes, run A registers and becomes champion
    # (two runs finishing together on a shared server). B must not overwrite A unseen: its
    # compare-and-set sees the champion moved, and B is judged again against A (worse: candidate).
    from marble.registry import register as register_module

    monkeypatch.setenv("TEST_MR_TOKEN", "t")
    fake = FakeModelRegistryClient()
    monkeypatch.setattr("marble.registry.kubeflow_backend.default_client_factory", lambda c, t: fake)
    cfg = kf_config(tmp_path)
    a, b = make_adapter(tmp_path, b"A-weights"), make_adapter(tmp_path, b"B-weights")
    ev_a = make_eval(tmp_path, a, {"brightness": 0.7, "colorfulness": 0.4})
    ev_b = make_eval(tmp_path, b, {"brightness": 0.6, "colorfulness": 0.3})
    decide, records = register_module._decide, {}

    def a_registers_while_b_decides(cfg_, registry, summary):
        decision = decide(cfg_, registry, summary)
        if "a" not in records and summary.lineage.adapter_sha256 == adapter_sha256(b):
            with monkeypatch.context() as m:
                m.setenv("MARBLE_RUN_ID", "run-a")
                records["a"] = register_adapter(cfg, a, ev_a, tmp_path / "reg-a")
        return decision

    monkeypatch.setattr(register_module, "_decide", a_registers_while_b_decides)
    monkeypatch.setenv("MARBLE_RUN_ID", "run-b")
    rec_b = register_adapter(cfg, b, ev_b, tmp_path / "reg-b")
    rec_a = records["a"]
    assert rec_a["gate_passed"] and rec_a["champion"] == rec_a["version"]
    assert rec_b["champion_before"] == rec_a["version"]  # B was judged against A, not against nothing
    assert not rec_b["gate_passed"] and rec_b["candidate"] == rec_b["version"]
    assert rec_b["champion"] == rec_a["version"]  # A stays champion
    b_tags = fake.versions[("marble-lora", rec_b["version"])].custom_properties
    assert b_tags["marble.gate"] == "failed"
