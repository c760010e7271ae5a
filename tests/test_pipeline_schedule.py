"""`marble pipeline compile | upload | run | schedule` against an in-memory KFP server.

The fake client (tests/_kfp_fake.py) has kfp.Client's signatures (checked here), returns the real
kfp_server_api models and fails as the server does (409 on a duplicate name, 404 on an unknown id).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import kfp
import pytest
import yaml
from _kfp_fake import FakeKfpServer, make_client_class
from kfp_server_api import ApiException

from marble.cli import main
from marble.configio import load_config
from pipelines import images, marble_pipeline
from pipelines.kfp_server import version_name
from pipelines.marble_pipeline import pipeline_arguments
from pipelines.schedule import ClusterError, check_cron

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
HOST = "http://kfp.example"
PINNED = {
    "cpu": "registry.example.com/team/marble-cpu@sha256:" + "1" * 64,
    "cuda": "registry.example.com/team/marble-cuda@sha256:" + "2" * 64,
}


_COMPILED: dict[tuple, bytes] = {}


@pytest.fixture(autouse=True)
def compile_once_per_input(monkeypatch):
    """These tests are about what the commands send, not the compiler (tests/test_pipeline_compile.py):
    each distinct input (config, lock, images) is compiled for real once, then its bytes are reused.
    Compiling under pytest costs seconds (kfp walks `inspect.stack()` for every resource setter)."""
    real = marble_pipeline.compile_pipeline

    def compile_pipeline(cfg, out, lock=None):
        key = (
            cfg.model_dump_json(),
            None if lock is None else repr(lock),
            repr(sorted(images.IMAGES.items())),
        )
        if key not in _COMPILED:
            _COMPILED[key] = real(cfg, out, lock=lock).read_bytes()
        Path(out).write_bytes(_COMPILED[key])
        return Path(out)

    monkeypatch.setattr(marble_pipeline, "compile_pipeline", compile_pipeline)


@pytest.fixture
def server(monkeypatch) -> FakeKfpServer:
    server = FakeKfpServer()
    monkeypatch.setattr(kfp, "Client", make_client_class(server))
    return server


@pytest.fixture
def pushed_images(monkeypatch):
    monkeypatch.setattr(images, "IMAGES", dict(PINNED))


def names(server: FakeKfpServer) -> list[str]:
    return [method for method, _ in server.calls]


def sent(server: FakeKfpServer, method: str) -> dict:
    return [kwargs for m, kwargs in server.calls if m == method][-1]


def test_the_fake_client_has_the_real_client_signatures():
    fake = make_client_class(FakeKfpServer())
    public = [n for n, f in vars(fake).items() if callable(f) and (not n.startswith("_") or n == "__init__")]
    assert len(public) >= 12
    for name in public:
        real, mine = inspect.signature(getattr(kfp.Client, name)), inspect.signature(getattr(fake, name))
        shape = [(p.name, p.kind, p.default) for p in real.parameters.values()]
        assert shape == [(p.name, p.kind, p.default) for p in mine.parameters.values()], name


def test_dry_run_prints_the_recurring_run_request(capsys, server):
    assert main(["pipeline", "schedule", "--config", TINY, "--dry-run"]) == 0
    request = json.loads(capsys.readouterr().out)
    cfg = load_config(TINY)
    assert request["trigger"] == {"cron_schedule": {"cron": cfg.pipeline.schedule_cron}}
    assert request["max_concurrency"] == 1 and request["no_catchup"] is True and request["mode"] == "ENABLE"
    assert request["runtime_config"]["parameters"] == pipeline_arguments(cfg)
    assert request["experiment"] == "marble" and request["host"] is None
    assert request["job_name"] == "marble-tiny" and request["pipeline_version"] == version_name(cfg)
    assert request["pipeline_spec"].startswith("compiled marble pipeline, sha256 ")
    assert server.calls == []  # nothing was contacted


def test_run_parameters_from_the_command_line_are_typed_and_checked_before_sending(capsys, server):
    argv = [
        "pipeline",
        "schedule",
        "--config",
        TINY,
        "--dry-run",
        "--param",
        "epochs=7",
        "--param",
        "lr=2e-3",
    ]
    assert main(argv) == 0
    params = json.loads(capsys.readouterr().out)["runtime_config"]["parameters"]
    assert params["epochs"] == 7 and params["lr"] == 0.002
    assert main(["pipeline", "schedule", "--config", TINY, "--dry-run", "--param", "lr=-1"]) == 2
    err = capsys.readouterr().err
    assert "run parameter lr (train.lr)" in err and "greater than 0" in err
    assert main(["pipeline", "schedule", "--config", TINY, "--dry-run", "--param", "epochs=2.5"]) == 2
    assert "epochs takes an integer" in capsys.readouterr().err
    assert main(["pipeline", "schedule", "--config", TINY, "--dry-run", "--param", "gpus=2"]) == 2
    assert "NAME one of run_name" in capsys.readouterr().err
    assert server.calls == []


def test_dry_run_takes_the_cron_from_the_command_line(capsys):
    assert main(["pipeline", "schedule", "--config", TINY, "--dry-run", "--cron", "0 30 2 * * *"]) == 0
    assert json.loads(capsys.readouterr().out)["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * *"


def test_a_five_field_cron_is_refused(capsys):
    assert main(["pipeline", "schedule", "--config", TINY, "--dry-run", "--cron", "0 3 * * 0"]) == 2
    assert "6" in capsys.readouterr().err
    with pytest.raises(ClusterError, match="second, minute, hour"):
        check_cron("* * *")


@pytest.mark.parametrize("command", ["schedule", "upload", "run"])
def test_placeholder_images_are_refused_before_contacting_the_server(capsys, server, monkeypatch, command):
    monkeypatch.setattr(
        images, "IMAGES", {"cpu": images.CPU_IMAGE.split("@")[0] + "@" + images.PLACEHOLDER_DIGEST}
    )
    assert main(["pipeline", command, "--config", TINY, "--host", HOST]) == 2
    assert "make images" in capsys.readouterr().err
    assert server.calls == []


def test_upload_creates_the_pipeline_then_versions_named_by_commit_and_config(capsys, server, pushed_images):
    cfg = load_config(TINY)
    assert main(["pipeline", "upload", "--config", TINY, "--host", HOST]) == 0
    assert f"uploaded pipeline 'marble' version '{version_name(cfg)}'" in capsys.readouterr().out
    (pipeline,) = server.pipelines.values()
    assert pipeline.display_name == "marble"
    # KFP keeps the first upload as the pipeline's initial version; ours is named by commit and config.
    assert sorted(v.display_name for v in server.versions.values()) == sorted(["marble", version_name(cfg)])
    assert version_name(cfg).endswith("-" + cfg.config_hash())

    # The same code and config again: found, nothing uploaded.
    assert main(["pipeline", "upload", "--config", TINY, "--host", HOST]) == 0
    assert "already uploaded" in capsys.readouterr().out
    assert len(server.versions) == 2 and names(server).count("upload_pipeline_version") == 1

    # Another config: a new version of the same pipeline.
    assert main(["pipeline", "upload", "--config", TINY, "--set", "train.epochs=3", "--host", HOST]) == 0
    assert len(server.pipelines) == 1 and len(server.versions) == 3


def test_a_version_name_that_exists_with_another_spec_is_refused(capsys, server, pushed_images):
    argv = ["pipeline", "upload", "--config", TINY, "--host", HOST, "--version-name", "v1"]
    assert main(argv) == 0
    assert main([*argv, "--set", "pipeline.gpus=0"]) == 2
    assert "already exists with another compiled spec" in capsys.readouterr().err
    assert len(server.versions) == 2


def test_upload_reports_a_server_failure(capsys, server, pushed_images):
    server.fail["upload_pipeline"] = ApiException(status=503, reason="Service Unavailable")
    assert main(["pipeline", "upload", "--config", TINY, "--host", HOST]) == 2
    assert "Service Unavailable" in capsys.readouterr().err
    assert server.versions == {}


def test_run_starts_the_uploaded_version_with_typed_arguments(capsys, server, pushed_images, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", "token-from-the-environment")
    assert main(["pipeline", "run", "--config", TINY, "--host", HOST, "--param", "epochs=3"]) == 0
    assert sent(server, "init") == {"host": HOST, "existing_token": "token-from-the-environment"}
    cfg = load_config(TINY)
    run = sent(server, "run_pipeline")
    version = server.versions[run["version_id"]]
    assert version.display_name == version_name(cfg) and run["pipeline_id"] == version.pipeline_id
    assert run["params"] == pipeline_arguments(cfg, {"epochs": 3})
    assert "run-" in capsys.readouterr().out


def test_run_of_a_named_version_needs_it_uploaded(capsys, server, pushed_images):
    assert main(["pipeline", "run", "--config", TINY, "--host", HOST, "--version", "nope"]) == 2
    assert "marble pipeline upload" in capsys.readouterr().err
    assert "run_pipeline" not in names(server)


def test_run_needs_local_or_host(capsys):
    assert main(["pipeline", "run", "--config", TINY]) == 2
    assert "--local" in capsys.readouterr().err


def test_schedule_twice_keeps_one_recurring_run(capsys, server, pushed_images):
    argv = ["pipeline", "schedule", "--config", TINY, "--host", HOST]
    assert main(argv) == 0
    (first,) = server.recurring_runs.values()
    assert main([*argv, "--cron", "0 0 4 * * 1"]) == 0
    out = capsys.readouterr().out
    (second,) = server.recurring_runs.values()
    assert second.recurring_run_id != first.recurring_run_id
    assert f"replaced the recurring run(s) of the same name: {first.recurring_run_id}" in out
    assert second.trigger.cron_schedule.cron == "0 0 4 * * 1" and second.mode == "ENABLE"
    cfg = load_config(TINY)
    version = server.versions[second.pipeline_version_reference.pipeline_version_id]
    assert version.display_name == version_name(cfg)
    assert second.runtime_config.parameters == pipeline_arguments(cfg)
    assert second.max_concurrency == "1" and second.no_catchup is True
    assert len(server.versions) == 2  # the version was uploaded once


def test_schedules_of_other_names_are_left_alone(server, pushed_images):
    assert main(["pipeline", "schedule", "--config", TINY, "--host", HOST]) == 0
    assert main(["pipeline", "schedule", "--config", TINY, "--host", HOST, "--name", "nightly"]) == 0
    assert sorted(r.display_name for r in server.recurring_runs.values()) == ["marble-tiny", "nightly"]


def test_a_failed_replacement_keeps_the_old_schedule_running(capsys, server, pushed_images):
    argv = ["pipeline", "schedule", "--config", TINY, "--host", HOST]
    assert main(argv) == 0
    (old,) = server.recurring_runs.values()
    server.fail["create_recurring_run"] = ApiException(status=500, reason="Internal Server Error")
    assert main([*argv, "--cron", "0 0 4 * * 1"]) == 2
    assert "creating recurring run 'marble-tiny' failed" in capsys.readouterr().err
    assert server.active_schedules("marble-tiny") == [old]
    assert names(server)[-1] == "enable_recurring_run"


def test_a_failed_delete_leaves_the_old_schedule_disabled(capsys, server, pushed_images):
    argv = ["pipeline", "schedule", "--config", TINY, "--host", HOST]
    assert main(argv) == 0
    server.fail["delete_recurring_run"] = ApiException(status=500, reason="Internal Server Error")
    assert main(argv) == 0
    (active,) = server.active_schedules("marble-tiny")
    assert (
        len(server.recurring_runs) == 2
        and active.trigger.cron_schedule.cron == load_config(TINY).pipeline.schedule_cron
    )


def test_compile_writes_ir_yaml_with_the_given_config(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    # Two processes must split the tiny epoch (48 samples): micro-batches of 8, no accumulation.
    two_gpus = ["pipeline.gpus=2", "train.micro_batch_size=8", "train.gradient_accumulation_steps=1"]
    sets = [a for s in two_gpus for a in ("--set", s)]
    assert main(["pipeline", "compile", "--config", TINY, *sets, "--out", str(out)]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert spec["pipelineInfo"]["name"] == "marble"
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "2"
    assert str(out) in capsys.readouterr().out


def test_namespace_reaches_the_client_and_every_experiment(capsys, server, pushed_images, monkeypatch):
    """Multi-user Kubeflow refuses runs and experiments without the profile's namespace."""
    args = ["--config", TINY, "--host", HOST, "--namespace", "team-vision"]
    assert main(["pipeline", "run", *args]) == 0
    assert sent(server, "create_experiment") == {"name": "marble", "namespace": "team-vision"}
    assert "in namespace team-vision" in capsys.readouterr().out
    assert main(["pipeline", "schedule", *args]) == 0
    assert sent(server, "create_experiment") == {"name": "marble", "namespace": "team-vision"}
    # From the environment: the endpoint variable the kfp client reads, and KFP_NAMESPACE.
    monkeypatch.setenv("KF_PIPELINES_ENDPOINT", "http://kfp.from-env")
    monkeypatch.setenv("KFP_NAMESPACE", "team-env")
    assert main(["pipeline", "run", "--config", TINY]) == 0
    assert sent(server, "init")["host"] == "http://kfp.from-env"
    assert sent(server, "create_experiment")["namespace"] == "team-env"
    capsys.readouterr()
    assert main(["pipeline", "schedule", "--config", TINY, "--dry-run"]) == 0
    request = json.loads(capsys.readouterr().out)
    assert (request["host"], request["namespace"]) == ("http://kfp.from-env", "team-env")
