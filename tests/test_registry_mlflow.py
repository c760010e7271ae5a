"""The register stage on the embedded MLflow store: idempotence, the gate moving aliases, fetching back."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from _registry_helpers import make_adapter, make_eval

from marble.configio import load_config
from marble.errors import RegistryError
from marble.eval.contract import EvalContractError
from marble.registry.base import adapter_sha256
from marble.registry.register import fetch_adapter, open_registry, register_adapter

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "configs/tiny.yaml")


@pytest.fixture(scope="module")
def blank_db(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow sqlite store. Creating one runs MLflow's alembic migrations
    (~2-5 s); the tests copy this file instead of migrating a fresh store each time."""
    from marble.registry.mlflow_backend import MlflowRegistry

    store = tmp_path_factory.mktemp("blank-mlflow")
    MlflowRegistry("warmup", store).client.search_registered_models()
    return store / "mlflow.db"


def seeded_store(blank_db: Path, db_path: Path) -> Path:
    db_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(blank_db, db_path)
    return db_path.parent


def test_register_is_idempotent_and_gate_moves_aliases(cfg, blank_db, tmp_path, monkeypatch):
    monkeypatch.delenv("MARBLE_RUN_ID", raising=False)
    store = seeded_store(blank_db, tmp_path / "registry" / "mlflow.db")
    good = make_adapter(tmp_path, b"good-adapter")
    good_eval = make_eval(tmp_path, good, {"brightness": 0.6, "colorfulness": 0.3, "jpeg": 0.5})

    first = register_adapter(cfg, good, good_eval, store)
    assert first["created"] and first["gate_passed"] and first["champion"] == first["version"] == "1"
    assert first["champion_before"] is None
    assert (store / "mlflow.db").is_file()
    assert json.loads((store / "registration.json").read_text())["version"] == "1"

    # the same adapter and run again: the existing version, nothing new, aliases untouched
    again = register_adapter(cfg, good, good_eval, store)
    assert not again["created"] and again["version"] == "1" and again["champion"] == "1"

    reg = open_registry(cfg, store)
    v1 = reg.get_alias("champion")
    assert v1.tags["marble.config_hash"] == "c0ffee" and v1.tags["marble.data_hash"] == "da7a"
    assert float(v1.tags["metric.adapter/brightness"]) == 0.6
    assert v1.tags["marble.adapter_sha256"] == adapter_sha256(good)
    assert v1.tags["marble.gate"] == "passed" and "marble.git_commit" in v1.tags

    # a worse adapter (dominated on the trained rewards): registered, but only as candidate
    worse = make_adapter(tmp_path, b"worse-adapter")
    r = register_adapter(
        cfg, worse, make_eval(tmp_path, worse, {"brightness": 0.5, "colorfulness": 0.3}), store
    )
    assert r["created"] and not r["gate_passed"] and "pareto" in r["gate_summary"]
    assert (r["version"], r["candidate"], r["champion"], r["champion_before"]) == ("2", "2", "1", "1")
    # the paper's composite over base, champion and candidate: the dominated candidate is below the champion
    scores = r["composite"]["scores"]
    assert scores["champion v1"] > scores["this adapter"] > scores["base"]
    assert first["composite"] is None  # no champion to compare with

    # a hacked one (dark monitor tripled) with better rewards: also refused
    hacked = make_adapter(tmp_path, b"hacked-adapter")
    h_eval = make_eval(tmp_path, hacked, {"brightness": 0.9, "colorfulness": 0.9}, dark_shift=2.0)
    r = register_adapter(cfg, hacked, h_eval, store)
    assert not r["gate_passed"] and "dark_fraction" in r["gate_summary"] and r["champion"] == "1"

    # a better one (a trade-off is fine, and it improves significantly) takes over
    better = make_adapter(tmp_path, b"better-adapter")
    r = register_adapter(
        cfg, better, make_eval(tmp_path, better, {"brightness": 0.7, "colorfulness": 0.25}), store
    )
    assert r["gate_passed"] and r["champion"] == r["version"] == "4" and r["champion_before"] == "1"

    # a different run id is a different registration of the same bytes
    monkeypatch.setenv("MARBLE_RUN_ID", "scheduled-2")
    r = register_adapter(
        cfg, better, make_eval(tmp_path / "x", better, {"brightness": 0.7, "colorfulness": 0.25}), store
    )
    assert r["created"] and r["version"] == "5"

    # fetch by alias: the champion's files come back byte for byte, sha256 verified
    path, version = fetch_adapter(cfg, store, "champion", tmp_path / "fetched")
    assert version.version == "5"
    assert (path / "pytorch_lora_weights.safetensors").read_bytes() == b"better-adapter"
    with pytest.raises(RegistryError, match="no version has the alias 'nobody' yet"):
        fetch_adapter(cfg, store, "nobody")


def test_concurrent_registrations_make_one_version(cfg, blank_db, tmp_path, monkeypatch):
    monkeypatch.setenv("MARBLE_RUN_ID", "fired-twice")
    store = seeded_store(blank_db, tmp_path / "registry" / "mlflow.db")
    ad = make_adapter(tmp_path, b"same-adapter")
    ev = make_eval(tmp_path, ad, {"brightness": 0.6, "colorfulness": 0.3})
    results, errors = [], []

    def go():
        try:
            results.append(register_adapter(cfg, ad, ev, store))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(r["created"] for r in results) == [False, False, True]
    assert {r["version"] for r in results} == {"1"}
    assert len(open_registry(cfg, store).find_versions(results[0]["key"])) == 1


def test_refuses_an_evaluation_of_another_adapter(cfg, tmp_path):
    a = make_adapter(tmp_path, b"a")
    b = make_adapter(tmp_path, b"b")
    with pytest.raises(RegistryError, match="evaluated adapter sha256"):
        register_adapter(cfg, b, make_eval(tmp_path, a, {"brightness": 0.1}), tmp_path / "reg")
    with pytest.raises(EvalContractError, match="run `marble evaluate`"):
        register_adapter(cfg, a, tmp_path / "missing", tmp_path / "reg")
    assert not (tmp_path / "reg" / "mlflow.db").exists()


def test_a_sqlite_uri_elsewhere_keeps_artifacts_beside_it(cfg, blank_db, tmp_path, monkeypatch):
    # the pipeline points every run at one sqlite file on its cache volume, so the champion persists
    monkeypatch.setenv("MARBLE_RUN_ID", "r1")
    shared = tmp_path / "volume" / "registry.db"
    seeded_store(blank_db, shared)
    cfg2 = cfg.model_copy(
        update={"registry": cfg.registry.model_copy(update={"tracking_uri": f"sqlite:///{shared}"})}
    )
    ad = make_adapter(tmp_path, b"on-a-volume")
    rec = register_adapter(
        cfg2, ad, make_eval(tmp_path, ad, {"brightness": 0.6}), tmp_path / "run-1-registration"
    )
    assert rec["champion"] == "1" and shared.is_file()
    assert rec["source"].startswith((tmp_path / "volume" / "mlartifacts").as_uri())
    assert (tmp_path / "run-1-registration" / "registration.json").is_file()
    assert not (tmp_path / "run-1-registration" / "mlflow.db").exists()


def test_a_champion_measured_under_another_protocol_is_not_compared(cfg, blank_db, tmp_path, monkeypatch):
    monkeypatch.setenv("MARBLE_RUN_ID", "r")
    store = seeded_store(blank_db, tmp_path / "registry" / "mlflow.db")
    champ = make_adapter(tmp_path, b"champ")
    assert register_adapter(
        cfg, champ, make_eval(tmp_path, champ, {"brightness": 0.6, "colorfulness": 0.3}), store
    )["gate_passed"]
    # dominated numbers, but measured on other data / seeds (protocol p2): not comparable with the
    # champion's, so the Pareto check is skipped and says why; under the same protocol they are refused
    new = make_adapter(tmp_path, b"new")
    p2 = register_adapter(
        cfg, new, make_eval(tmp_path, new, {"brightness": 0.5, "colorfulness": 0.3}, protocol="p2"), store
    )
    pareto = next(c for c in p2["gate"]["checks"] if c["rule"] == "pareto")
    assert (
        p2["gate_passed"] and "not comparable" in pareto["detail"] and p2["champion"] == p2["version"] == "2"
    )
    assert open_registry(cfg, store).get_alias("champion").tags["marble.eval_protocol"] == "p2"


@pytest.mark.parametrize("kind", ["mlflow", "kubeflow"])
@pytest.mark.parametrize("name", ["x' or name like '%", "a b", "../up", "", "-lead"])
def test_a_model_name_that_could_change_a_search_filter_or_a_path_is_refused(kind, name):
    # The MLflow backend builds its search filter from the name; the Model Registry puts it in URLs.
    from marble.configio import ConfigError, read_config_dict, validate_config

    data = read_config_dict(REPO / "configs" / "tiny.yaml")
    data["registry"] = {"kind": kind, "model_name": name}
    with pytest.raises(ConfigError, match=rf"registry\.{kind}\.model_name"):
        validate_config(data, "tiny.yaml")
