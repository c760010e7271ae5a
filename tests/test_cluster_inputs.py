"""What a cluster pod reads and what KFP's cache sees: prompt files from data.root (the PVC) or through
DVC from a Git repository and its remote; fingerprints that change with the data and the models."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from marble.cluster.fingerprint import data_fingerprint, models_fingerprint
from marble.cluster.preflight import cluster_problems
from marble.configio import load_config
from marble.data.prepare import prepare_prompts
from marble.errors import DataError

REPO = Path(__file__).resolve().parents[1]
PROMPTS = "a red cube\na blue sphere\na green cone\na yellow star\n"


def txt_config(*overrides: str):
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            "data.sources=[{kind: txt, path: prompts/p.txt}]",
            "rewards=[{name: b, kind: brightness}]",
            *overrides,
        ],
    )


def test_relative_sources_resolve_against_data_root(tmp_path):
    (tmp_path / "pvc" / "prompts").mkdir(parents=True)
    (tmp_path / "pvc" / "prompts" / "p.txt").write_text(PROMPTS)
    cfg = txt_config(f"data.root={tmp_path / 'pvc'}")
    assert cluster_problems(cfg) == []
    manifest = prepare_prompts(cfg, tmp_path / "out")
    assert manifest.is_file()
    with pytest.raises(DataError, match=r"pvc/prompts/nope.txt: prompt source not found"):
        prepare_prompts(
            txt_config(f"data.root={tmp_path / 'pvc'}", "data.sources.0.path=prompts/nope.txt"),
            tmp_path / "o2",
        )
    assert "relative to the repository" in cluster_problems(txt_config())[0]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.mark.slow  # over 10 s on the 2-core machine: `make test-slow`
@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_sources_are_read_through_dvc_at_a_revision_and_the_fingerprint_follows(tmp_path):
    """A Git+DVC project whose prompt file lives only on its (local) remote, as on a cluster."""
    project, remote = tmp_path / "project", tmp_path / "remote"
    project.mkdir()
    _git(project, "init", "-q")
    _git(project, "config", "user.email", "t@example.com")
    _git(project, "config", "user.name", "t")
    dvc = [str(Path(shutil.which("dvc") or REPO / ".venv" / "bin" / "dvc"))]
    run = lambda *a: subprocess.run([*dvc, *a], cwd=project, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    run("remote", "add", "-d", "store", str(remote))
    (project / "prompts").mkdir()
    (project / "prompts" / "p.txt").write_text(PROMPTS)
    run("add", "prompts/p.txt")
    run("push", "-q")
    _git(project, "add", "-A")
    _git(project, "commit", "-q", "-m", "v1")
    (project / "prompts" / "p.txt").write_text(PROMPTS + "a white torus\n")
    run("add", "prompts/p.txt")
    run("push", "-q")
    _git(project, "commit", "-q", "-am", "v2")
    shutil.rmtree(project / ".dvc" / "cache")  # the data exists only on the remote now

    v1 = txt_config(f"data.dvc.repo={project}", "data.dvc.rev=HEAD~1")
    v2 = txt_config(f"data.dvc.repo={project}", "data.dvc.rev=HEAD")
    assert cluster_problems(v1) == []
    prepare_prompts(v1, tmp_path / "out1")
    assert data_fingerprint(v1) == data_fingerprint(v1) != data_fingerprint(v2)
    missing = txt_config(f"data.dvc.repo={project}", "data.sources.0.path=prompts/nope.txt")
    with pytest.raises(
        DataError, match=r"cannot read the prompt source through DVC \(field data.sources.0.path"
    ):
        prepare_prompts(missing, tmp_path / "out3")


def test_fingerprints_change_with_the_data_and_the_models(tmp_path):
    (tmp_path / "prompts").mkdir()
    path = tmp_path / "prompts" / "p.txt"
    path.write_text(PROMPTS)
    cfg = txt_config(f"data.root={tmp_path}")
    before = data_fingerprint(cfg)
    path.write_text(PROMPTS + "a white torus\n")
    assert data_fingerprint(cfg) != before
    tiny = load_config(REPO / "configs" / "tiny.yaml")
    assert models_fingerprint(tiny) == models_fingerprint(tiny)
    assert models_fingerprint(tiny) != models_fingerprint(
        load_config(REPO / "configs" / "tiny.yaml", ["model.tiny.seed=1"])
    )


FAKE_LAUNCHER = """#!/usr/bin/env python3
import json, sys
from pathlib import Path
argv = sys.argv[1:]
Path(argv[argv.index("--out") + 1], "adapter").mkdir(parents=True)
Path(argv[argv.index("--out") + 1], "launched.json").write_text(json.dumps(argv))
sys.exit(int(Path(argv[argv.index("--config") + 1]).parent.joinpath("exit_code").read_text()))
"""


@pytest.mark.parametrize("exit_code", [0, 3])
def test_one_node_multi_gpu_runs_the_launcher_in_the_task(tmp_path, exit_code):
    from marble.cluster.launch import LaunchError, LaunchPlan
    from marble.cluster.train_task import run_train_task

    launcher = tmp_path / "fake-accelerate"
    launcher.write_text(FAKE_LAUNCHER)
    launcher.chmod(0o755)
    cfg = load_config(
        REPO / "configs" / "tiny.yaml", ["train.micro_batch_size=8", "train.gradient_accumulation_steps=1"]
    )
    plan = LaunchPlan("accelerate", 1, 2, [str(launcher), "--num_processes", "2"])
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "exit_code").write_text(str(exit_code))
    if exit_code:
        with pytest.raises(LaunchError, match="exited with code 3"):
            run_train_task(cfg, plan, tmp_path / "prompts", None, run_dir, "r")
        return
    train_dir = run_train_task(cfg, plan, tmp_path / "prompts", str(tmp_path / "cache"), run_dir, "r")
    import json

    argv = json.loads((train_dir / "launched.json").read_text())
    assert argv[:5] == ["--num_processes", "2", "-m", "marble.cli", "train"]
    assert argv[argv.index("--out") + 1] == str(run_dir / "train")
    assert argv[argv.index("--reward-cache") + 1] == str(tmp_path / "cache")
    assert load_config(argv[argv.index("--config") + 1]) == cfg  # the run's config, written for every rank
