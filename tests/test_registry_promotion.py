"""The promotion decision as a step of its own (the pipeline branches on it), on a real MLflow store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _registry_helpers import make_adapter, make_eval

from marble.config import MarbleConfig
from marble.configio import load_config
from marble.errors import RegistryError
from marble.registry.promotion import branch_check, decide_promotion, registered_alias, registry_link
from marble.registry.register import register_adapter

REPO = Path(__file__).resolve().parents[1]
MEANS = {"brightness": 0.6, "colorfulness": 0.3, "jpeg": 0.5}


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "configs/tiny.yaml")


@pytest.fixture(scope="module")
def blank_db(tmp_path_factory) -> Path:
    from marble.registry.mlflow_backend import MlflowRegistry

    store = tmp_path_factory.mktemp("blank-mlflow")
    MlflowRegistry("warmup", store).client.search_registered_models()
    return store / "mlflow.db"


@pytest.fixture
def store(blank_db, tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("MARBLE_RUN_ID", raising=False)
    (tmp_path / "registry").mkdir()
    shutil.copyfile(blank_db, tmp_path / "registry" / "mlflow.db")
    return tmp_path / "registry"


def test_the_decision_is_what_registration_then_does_and_nothing_is_written(cfg, store, tmp_path):
    good = make_adapter(tmp_path, b"good")
    good_eval = make_eval(tmp_path, good, MEANS)
    decision = decide_promotion(cfg, good, good_eval, store)
    assert decision["decision"] == "champion" and decision["passed"] is True
    assert decision["champion_before"] is None and decision["version"] is None
    assert {c["rule"] for c in decision["checks"]} >= {"regression", "improvement", "held_out", "monitor"}
    record = register_adapter(cfg, good, good_eval, store)
    assert registered_alias(record) == "champion" and branch_check(record, "champion") is None

    # A worse adapter against that champion: dominated, so the decision is 'candidate'.
    worse = make_adapter(tmp_path, b"worse")
    worse_eval = make_eval(tmp_path, worse, {k: v - 0.2 for k, v in MEANS.items()})
    decision = decide_promotion(cfg, worse, worse_eval, store)
    assert decision["decision"] == "candidate" and decision["champion_before"] == "1"
    assert any(c["rule"] == "pareto" and not c["passed"] for c in decision["checks"])
    # Deciding registered nothing: still one version.
    from marble.registry.register import open_registry

    assert open_registry(cfg, store).get_alias("candidate") is None


def test_a_registered_adapter_keeps_its_decision(cfg, store, tmp_path):
    """A retried run: the version exists with its alias applied; the gate reports that decision."""
    bad = make_adapter(tmp_path, b"bad")
    bad_eval = make_eval(tmp_path, bad, MEANS, improve=False)
    register_adapter(cfg, bad, bad_eval, store)
    decision = decide_promotion(cfg, bad, bad_eval, store)
    assert decision["decision"] == "candidate" and decision["version"] == "1" and decision["checks"] == []
    assert decision["summary"].startswith("failed")


def test_without_a_store_there_is_no_champion(cfg, tmp_path):
    good = make_adapter(tmp_path, b"good")
    decision = decide_promotion(cfg, good, make_eval(tmp_path, good, MEANS))
    assert decision["decision"] == "champion" and decision["champion_before"] is None
    assert not list(tmp_path.glob("**/mlflow.db"))


def test_an_evaluation_of_another_adapter_is_refused(cfg, tmp_path):
    a, b = make_adapter(tmp_path, b"a"), make_adapter(tmp_path, b"b")
    with pytest.raises(RegistryError, match="evaluated adapter sha256"):
        decide_promotion(cfg, b, make_eval(tmp_path, a, MEANS))


def test_branch_check_names_a_disagreement():
    record = {"gate_passed": False, "gate_summary": "failed: pareto/*: dominated", "champion_before": "4"}
    assert registered_alias(record) == "candidate"
    note = branch_check(record, "champion")
    assert "decided 'champion'" in note and "gave 'candidate'" in note and "dominated" in note
    assert branch_check(record, "candidate") is None


def test_registry_link_per_backend(cfg):
    assert registry_link(cfg, "3") == "models:/marble-lora/3 (embedded store in the registration artifact)"
    server = cfg.model_copy(
        update={"registry": cfg.registry.model_copy(update={"tracking_uri": "https://mlflow.example/"})}
    )
    assert registry_link(server, "3") == "https://mlflow.example/#/models/marble-lora/versions/3"
    sqlite = cfg.model_copy(
        update={
            "registry": cfg.registry.model_copy(
                update={"tracking_uri": "sqlite:////mnt/c/registry/mlflow.db"}
            )
        }
    )
    assert (
        registry_link(sqlite, "2")
        == "models:/marble-lora/2 (tracking URI sqlite:////mnt/c/registry/mlflow.db)"
    )
    kubeflow = MarbleConfig.model_validate(
        {**cfg.model_dump(), "registry": {"kind": "kubeflow", "server_address": "http://mr.kubeflow.svc"}}
    )
    assert (
        registry_link(kubeflow, "v-abc")
        == f"http://mr.kubeflow.svc:{kubeflow.registry.port} registered model 'marble-lora' version 'v-abc'"
    )


def test_marble_gate_previews_the_decision(cfg, store, tmp_path, capsys):
    from marble.cli import main

    good = make_adapter(tmp_path, b"good")
    good_eval = make_eval(tmp_path, good, MEANS)
    argv = ["gate", "--config", str(REPO / "configs/tiny.yaml"), "--adapter", str(good)]
    argv += ["--eval-dir", str(good_eval), "--out", str(tmp_path / "gate"), "--registry-dir", str(store)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["decision"] == "champion"
    assert json.loads((tmp_path / "gate" / "gate.json").read_text()) == printed
