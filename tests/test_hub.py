"""The hub layer: one `offline` switch passed explicitly (config or HF_HUB_OFFLINE, parsed once) and
honoured by every stage that touches the hub; no process-wide side effect."""

from __future__ import annotations

import os

import pytest

from marble.cli import main
from marble.configio import load_config
from marble.errors import CacheError
from marble.hub import Hub, env_offline
from marble.model_cache import cache_models
from marble.models.loading import load_pipeline, resolve_pretrained


@pytest.mark.parametrize(
    ("value", "offline"), [("1", True), ("YES", True), ("true", True), ("0", False), ("", False)]
)
def test_the_environment_variable_is_parsed_one_way(monkeypatch, value, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert env_offline() is offline and Hub.create().offline is offline
    assert Hub.create(offline=True).offline  # the config's setting is never overridden to online


def test_offline_hub_ids_are_looked_up_in_local_files_only(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert Hub.create(offline=True).locate("org/model", "abc") == (
        "org/model",
        {"revision": "abc", "local_files_only": True},
    )
    assert Hub.create().locate("org/model", None) == ("org/model", {})


@pytest.mark.tiny_model
def test_model_offline_reaches_the_base_model_without_touching_the_environment(tiny_config, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    local = resolve_pretrained(tiny_config.model)[0]  # the built tiny pipeline, loaded as a local directory
    model = tiny_config.model.model_copy(update={"pretrained": local, "tiny": None, "offline": True})
    assert resolve_pretrained(model.model_copy(update={"pretrained": "org/sd3"}))[1]["local_files_only"]
    load_pipeline(model)
    assert "HF_HUB_OFFLINE" not in os.environ  # no side effect on the process (and on later stages)


def test_cache_rewards_honours_model_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("MARBLE_HUB_MIRROR", raising=False)
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda *a, **k: pytest.fail("went online"))
    cfg = load_config(
        "configs/tiny.yaml",
        ["model.offline=true", "rewards=[{name: c, kind: clipscore, model: nobody/nothing}]"],
    )
    with pytest.raises(CacheError, match="offline.*nobody/nothing|nobody/nothing.*offline"):
        cache_models(cfg, tmp_path / "cache")


def test_rewards_check_honours_model_offline(tmp_path, monkeypatch, capsys):
    import transformers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def record(cls, name, **kwargs):
        calls.append((name, kwargs))
        raise OSError(f"{name} is not in the local cache")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", classmethod(record))
    argv = ["rewards", "check", "--config", "configs/tiny.yaml", "--set", "model.offline=true",
            "--set", "rewards=[{name: c, kind: clipscore, model: nobody/nothing, revision: abc}]"]  # fmt: skip
    assert main(argv) == 2
    assert calls == [("nobody/nothing", {"revision": "abc", "local_files_only": True})]
    assert "nobody/nothing" in capsys.readouterr().err
