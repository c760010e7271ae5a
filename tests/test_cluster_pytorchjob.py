"""The train task's PyTorchJob path end to end against a fake Kubernetes API that can fail: the job the
task creates satisfies the vendored Training Operator CRD and Pod Security "restricted"; the task
publishes the adapter when the job succeeds, fails with the job's message when it fails, deletes it and
fails when it times out, deletes it when the run is cancelled (SIGTERM), and resumes the same run's job
on a retry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _fake_kube import FakeKube
from _kube_contracts import pytorchjob_errors, restricted_violations
from kfp import dsl

from components import train as train_component
from marble.cluster.jobrun import JobFailed, JobRunner, JobTimedOut, job_state
from marble.cluster.kubeapi import JobApi, KubeApiError
from marble.cluster.launch import LaunchError, plan_launch
from marble.cluster.pytorchjob import build_job, job_name
from marble.cluster.train_task import cleanup_run_jobs
from marble.configio import load_config
from marble.hub.lock import ModelLock, read_lock
from marble.model_cache import lock_parameters

REPO = Path(__file__).resolve().parents[1]
NS = "kubeflow-user-example-com"
IMAGE = "registry.example.com/team/marble-cuda@sha256:" + "2" * 64
MULTI = [
    "pipeline.gpus=8",
    "pipeline.nodes=3",
    "pipeline.cache_access_mode=ReadWriteMany",
    "pipeline.job_poll_s=0.02",
]


def paper(*extra: str):
    return load_config(REPO / "configs" / "sd35m-marble.yaml", [*MULTI, *extra])


def write_adapter(job: dict) -> None:
    """Stand-in for the replicas: `marble train --out DIR` exports DIR/adapter."""
    command = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    adapter = Path(command[command.index("--out") + 1]) / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(
        b"lora from " + job["metadata"]["name"].encode()
    )


MODEL_LOCK = ModelLock(config="sd35m-marble.yaml")
MANIFEST_SHA = "ab" * 32


def run_task(fake: FakeKube, tmp_path: Path, cfg, run_id: str = "run-1"):
    prompts = tmp_path / "artifacts" / "prompts"
    prompts.mkdir(parents=True, exist_ok=True)
    (prompts / "train.jsonl").write_text('{"prompt": "a cat"}\n')
    adapter = dsl.Model(name="adapter", uri=str(tmp_path / "artifacts" / "adapter"), metadata={})
    adapter.path = str(tmp_path / "artifacts" / "adapter")
    plan = plan_launch(cfg, image=IMAGE).to_dict()
    result = train_component.component.python_func(
        config=json.loads(json.dumps(cfg.model_dump(mode="json", exclude_none=True))),
        prompts=dsl.Dataset(name="prompts", uri=str(prompts), metadata={}),
        reward_cache_dir=str(tmp_path / "pvc" / "reward-cache"),
        reward_cache_sha256=MANIFEST_SHA,
        **lock_parameters(MODEL_LOCK),
        work_root=str(tmp_path / "pvc"),
        run_id=run_id,
        launch=plan,
        tensorboard_pvc="marble-cache",
        adapter=adapter,
        **view_outputs(tmp_path / "artifacts"),
    )
    return result, Path(adapter.path)


def view_outputs(root: Path) -> dict:
    """The train task's run-view outputs (metrics, curves page, TensorBoard viewer)."""
    return {
        "metrics": dsl.Metrics(name="metrics", uri=str(root / "metrics"), metadata={}),
        "training_curves": dsl.HTML(name="training_curves", uri=str(root / "training_curves"), metadata={}),
        "mlpipeline_ui_metadata": dsl.Artifact(
            name="ui", uri=str(root / "mlpipeline_ui_metadata"), metadata={}
        ),
    }


@pytest.fixture
def api_of(monkeypatch):
    """Point the launcher at a fake server (the real JobApi and kubernetes client)."""

    def use(fake: FakeKube):
        monkeypatch.setattr(
            "marble.cluster.train_task.JobApi", lambda ns: JobApi(ns, client=fake.api_client()), raising=False
        )
        monkeypatch.setattr("marble.cluster.kubeapi.api_client", fake.api_client)
        monkeypatch.setenv("POD_NAMESPACE", NS)

    return use


def test_built_job_satisfies_the_crd_and_pod_security():
    cfg = paper("pipeline.gang_scheduler=volcano")
    plan = plan_launch(cfg, image=IMAGE)
    job = build_job(
        cfg, plan, name=job_name("r"), namespace=NS, run_id="r", command=plan.train_argv("c", "p", None, "o")
    )
    assert pytorchjob_errors(job) == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert job["spec"]["nprocPerNode"] == "8" and job["spec"]["runPolicy"]["schedulingPolicy"] == {
        "minAvailable": 3
    }
    for spec in replicas.values():
        pod = spec["template"]["spec"]
        assert restricted_violations(pod) == []
        assert spec["template"]["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
        assert pod["schedulerName"] == "volcano" and pod["containers"][0]["name"] == "pytorch"
        assert pod["containers"][0]["command"][:3] == ["torchrun", "--rdzv-conf", "timeout=1800"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_success_publishes_the_adapter_the_job_wrote(tmp_path, api_of, capsys):
    with FakeKube(["Created", "Running", "Running", "Succeeded"], on_success=write_adapter) as fake:
        api_of(fake)
        result, adapter = run_task(fake, tmp_path, paper())
    (job,) = fake.created
    assert job["metadata"]["namespace"] == NS and job["metadata"]["name"] == job_name("run-1")
    run_dir = tmp_path / "pvc" / "runs" / "run-1"
    command = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--out") + 1] == str(run_dir / "train")
    assert (run_dir / "prompts" / "train.jsonl").is_file() and (run_dir / "config.yaml").is_file()
    # the replicas' `marble train` finds the run's model lock beside its config, and the manifest hash
    assert read_lock(run_dir / "config.lock.yaml") == MODEL_LOCK
    assert command[command.index("--reward-cache-sha256") + 1] == MANIFEST_SHA
    assert result.train_dir == str(run_dir / "train")
    assert (adapter / "pytorch_lora_weights.safetensors").read_bytes().startswith(b"lora from marble-train-")
    out = capsys.readouterr().out
    assert "step 2 loss" in out and "succeeded" in out  # the master's log was streamed
    assert fake.seen("DELETE") == []


def test_a_failed_job_fails_the_task_with_its_message(tmp_path, api_of):
    with FakeKube(["Created", "Running", "Failed:PyTorchJobFailed:master exited with code 1"]) as fake:
        api_of(fake)
        with pytest.raises(JobFailed, match="master exited with code 1") as err:
            run_task(fake, tmp_path, paper())
    assert "last master log lines" in str(err.value)
    assert not (tmp_path / "artifacts" / "adapter").exists()


def test_a_job_that_outlives_the_deadline_is_deleted_and_fails(tmp_path):
    now = [0.0]
    with FakeKube(["Created", "Running"]) as fake:
        runner = JobRunner(
            JobApi(NS, client=fake.api_client()), poll_s=600, clock=lambda: now[0],
            sleep=lambda s: now.__setitem__(0, now[0] + s), echo=lambda m: None,
        )  # fmt: skip
        cfg = paper()
        plan = plan_launch(cfg, image=IMAGE)
        job = build_job(cfg, plan, name="marble-train-t", namespace=NS, run_id="t", command=["torchrun"])
        with pytest.raises(JobTimedOut, match="did not finish within 3600 s"):
            runner.run(job, timeout_s=3600)
        assert fake.seen("DELETE") == [f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs/marble-train-t"]
        assert fake.jobs == {}


def test_a_retry_of_the_same_run_replaces_its_failed_job_and_adopts_a_running_one(tmp_path):
    cfg = paper()
    plan = plan_launch(cfg, image=IMAGE)
    job = build_job(cfg, plan, name="marble-train-r", namespace=NS, run_id="r", command=["torchrun"])
    quiet = {"poll_s": 0.01, "echo": lambda m: None}
    with FakeKube(["Failed:BackoffLimitExceeded:x", "Succeeded"]) as fake:
        fake.jobs["marble-train-r"] = job
        JobRunner(JobApi(NS, client=fake.api_client()), **quiet).run(job, timeout_s=60)
        assert len(fake.seen("DELETE")) == 1 and len(fake.created) == 1  # replaced, then ran
    with FakeKube(["Running", "Succeeded"]) as fake:
        fake.jobs["marble-train-r"] = job
        JobRunner(JobApi(NS, client=fake.api_client()), **quiet).run(job, timeout_s=60)
        assert fake.seen("DELETE") == [] and fake.created == []  # adopted


def test_an_api_refusal_names_the_call(tmp_path, api_of):
    with FakeKube(["Running"], fail={"POST": 403}) as fake:
        api_of(fake)
        with pytest.raises(KubeApiError, match=r"create PyTorchJob marble-train-\w+ in namespace .* 403"):
            run_task(fake, tmp_path, paper())


def test_an_invalid_job_is_refused_by_the_crd_schema(tmp_path):
    cfg = paper()
    plan = plan_launch(cfg, image=IMAGE)
    job = build_job(cfg, plan, name="marble-train-x", namespace=NS, run_id="x", command=["torchrun"])
    job["spec"]["runPolicy"]["backoffLimitt"] = 3  # a typo the API server would prune silently
    with FakeKube(["Running"]) as fake, pytest.raises(KubeApiError, match="422"):
        JobApi(NS, client=fake.api_client()).create(job)


def test_the_exit_handler_deletes_only_the_runs_active_jobs():
    cfg = paper()
    plan = plan_launch(cfg, image=IMAGE)
    with FakeKube(["Running"]) as fake:
        api = JobApi(NS, client=fake.api_client())
        api.create(build_job(cfg, plan, name="marble-train-a", namespace=NS, run_id="run-a", command=["t"]))
        api.create(build_job(cfg, plan, name="marble-train-b", namespace=NS, run_id="run-b", command=["t"]))
        assert cleanup_run_jobs("run-a", job_api=lambda: api) == ["marble-train-a"]
        assert set(fake.jobs) == {"marble-train-b"}
    assert job_state({"status": {"conditions": [{"type": "Succeeded", "status": "True"}]}})[0] == "Succeeded"


def test_a_layout_that_cannot_split_the_epoch_starts_nothing(tmp_path, api_of):
    cfg = paper()
    with FakeKube(["Running"]) as fake:
        api_of(fake)
        prompts = tmp_path / "p"
        prompts.mkdir()
        plan = plan_launch(cfg, image=IMAGE).to_dict() | {"nodes": 4}  # compiled for 3, run as 4 x 8
        with pytest.raises(LaunchError, match="Valid process counts: 1, 2, 3, 4, 6, 8, 12, 24"):
            train_component.component.python_func(
                config=cfg.model_dump(mode="json", exclude_none=True),
                prompts=dsl.Dataset(name="p", uri=str(prompts), metadata={}),
                reward_cache_dir="", reward_cache_sha256="", model_lock={}, model_lock_sha256="",
                work_root=str(tmp_path / "pvc"), run_id="r", launch=plan, tensorboard_pvc="",
                adapter=dsl.Model(name="a", uri=str(tmp_path / "a"), metadata={}), **view_outputs(tmp_path),
            )  # fmt: skip
        assert fake.requests == []


CANCEL_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from marble.cluster.launch import plan_launch
    from marble.cluster.train_task import run_train_task
    from marble.configio import load_config

    cfg = load_config(sys.argv[1], sys.argv[2:])
    prompts = Path(sys.argv[0]).parent / "prompts"
    prompts.mkdir(exist_ok=True)
    try:
        run_train_task(cfg, plan_launch(cfg, image="img@sha256:" + "2" * 64), prompts, None,
                       Path(sys.argv[0]).parent / "pvc" / "runs" / "run-c", "run-c")
    except Exception as exc:
        print(f"TASK FAILED: {type(exc).__name__}: {exc}", flush=True)
        sys.exit(1)
    """
)


def test_a_cancelled_run_deletes_its_job(tmp_path):
    """SIGTERM (how Kubernetes stops the task pod of a terminated run) deletes the PyTorchJob."""
    script = tmp_path / "task.py"
    script.write_text(CANCEL_SCRIPT)
    with FakeKube(["Created", "Running"]) as fake:
        env = {**os.environ, "KUBECONFIG": fake.kubeconfig(tmp_path / "kubeconfig"), "POD_NAMESPACE": NS}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        cfg_args = [str(REPO / "configs" / "sd35m-marble.yaml"), *MULTI]
        proc = subprocess.Popen(
            [sys.executable, str(script), *cfg_args], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        deadline = time.monotonic() + 120
        while len(fake.seen("GET")) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert fake.created, "the task never created its job"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "TASK FAILED: RunCancelled: pipeline run cancelled; PyTorchJob marble-train-" in out
    assert len(fake.seen("DELETE")) == 1 and fake.jobs == {}
