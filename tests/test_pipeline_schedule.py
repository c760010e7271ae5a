"""`marble pipeline compile | run | schedule`: the requests sent to a KFP endpoint, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import kfp
import pytest
import yaml

from marble.cli import main
from marble.configio import load_config
from pipelines import images
from pipelines.marble_pipeline import config_dict
from pipelines.schedule import ClusterError, check_cron

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
PINNED = {
    "cpu": "registry.example.com/team/marble-cpu@sha256:" + "1" * 64,
    "cuda": "registry.example.com/team/marble-cuda@sha256:" + "2" * 64,
}


class FakeClient:
    """Records what the kfp client would send; checks the package exists when it is read."""

    calls: list[tuple[str, dict]] = []

    def __init__(self, host=None, existing_token=None, **_):
        self.host, self.token = host, existing_token
        FakeClient.calls.append(("init", {"host": host, "existing_token": existing_token}))

    def create_experiment(self, name):
        FakeClient.calls.append(("create_experiment", {"name": name}))
        return type("Experiment", (), {"experiment_id": "exp-1"})()

    def create_recurring_run(self, **kwargs):
        assert Path(kwargs["pipeline_package_path"]).is_file()
        FakeClient.calls.append(("create_recurring_run", kwargs))
        return type("RecurringRun", (), {"recurring_run_id": "rr-1"})()

    def create_run_from_pipeline_package(self, pipeline_file, **kwargs):
        assert Path(pipeline_file).is_file()
        FakeClient.calls.append(("create_run", kwargs))
        return type("Run", (), {"run_id": "run-1"})()


@pytest.fixture
def fake_kfp(monkeypatch):
    FakeClient.calls = []
    monkeypatch.setattr(kfp, "Client", FakeClient)
    return FakeClient


@pytest.fixture
def pushed_images(monkeypatch):
    monkeypatch.setattr(images, "IMAGES", dict(PINNED))


def test_dry_run_prints_the_recurring_run_request(capsys, fake_kfp):
    assert main(["pipeline", "schedule", "--config", TINY, "--dry-run"]) == 0
    request = json.loads(capsys.readouterr().out)
    cfg = load_config(TINY)
    assert request["trigger"] == {"cron_schedule": {"cron": cfg.pipeline.schedule_cron}}
    assert request["max_concurrency"] == 1 and request["no_catchup"] is True and request["mode"] == "ENABLE"
    assert request["runtime_config"]["parameters"] == {"config": config_dict(cfg)}
    assert request["experiment"] == "marble" and request["host"] is None
    assert request["pipeline_spec"].startswith("compiled marble pipeline, sha256 ")
    assert fake_kfp.calls == []  # nothing was contacted


def test_dry_run_takes_the_cron_from_the_command_line(capsys):
    assert main(["pipeline", "schedule", "--config", TINY, "--dry-run", "--cron", "0 30 2 * * *"]) == 0
    assert json.loads(capsys.readouterr().out)["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * *"


def test_a_five_field_cron_is_refused(capsys):
    assert main(["pipeline", "schedule", "--config", TINY, "--dry-run", "--cron", "0 3 * * 0"]) == 2
    assert "6" in capsys.readouterr().err
    with pytest.raises(ClusterError, match="second, minute, hour"):
        check_cron("* * *")


def test_schedule_refuses_placeholder_images(capsys, fake_kfp, monkeypatch):
    monkeypatch.setattr(
        images, "IMAGES", {"cpu": images.CPU_IMAGE.split("@")[0] + "@" + images.PLACEHOLDER_DIGEST}
    )
    assert main(["pipeline", "schedule", "--config", TINY, "--host", "http://kfp.example"]) == 2
    assert "make images" in capsys.readouterr().err
    assert fake_kfp.calls == []


def test_schedule_sends_a_non_overlapping_no_catchup_recurring_run(
    capsys, fake_kfp, pushed_images, monkeypatch
):
    monkeypatch.setenv("KFP_TOKEN", "token-from-the-environment")
    assert main(["pipeline", "schedule", "--config", TINY, "--host", "http://kfp.example"]) == 0
    (_, init), (_, exp), (_, sent) = fake_kfp.calls
    assert init == {"host": "http://kfp.example", "existing_token": "token-from-the-environment"}
    assert exp == {"name": "marble"}
    cfg = load_config(TINY)
    assert sent["experiment_id"] == "exp-1"
    assert sent["cron_expression"] == cfg.pipeline.schedule_cron
    assert sent["max_concurrency"] == 1 and sent["no_catchup"] is True and sent["enabled"] is True
    assert sent["params"] == {"config": config_dict(cfg)}
    assert "rr-1" in capsys.readouterr().out


def test_cluster_run_submits_the_compiled_pipeline(capsys, fake_kfp, pushed_images):
    assert main(["pipeline", "run", "--config", TINY, "--host", "http://kfp.example"]) == 0
    (_, sent) = fake_kfp.calls[-1]
    assert sent["arguments"] == {"config": config_dict(load_config(TINY))}
    assert "run-1" in capsys.readouterr().out


def test_run_needs_local_or_host(capsys):
    assert main(["pipeline", "run", "--config", TINY]) == 2
    assert "--local" in capsys.readouterr().err


def test_compile_writes_ir_yaml_with_the_given_config(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["pipeline", "compile", "--config", TINY, "--set", "pipeline.gpus=2", "--out", str(out)]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert spec["pipelineInfo"]["name"] == "marble"
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "2"
    assert str(out) in capsys.readouterr().out
