"""`pip install .` (not editable) gives a working `marble`: shipped configs and the pipeline's default
config come from the wheel, not from a repository root; `marble bench` says it needs a checkout.

Offline and fast: the wheel is built without build isolation (the venv's setuptools) from a copy of the
sources, and installed without dependencies into a fresh venv that sees this venv's site-packages
through a path entry (so torch, kfp, ... are reused; the editable marble is not, since `.pth` files of a
path entry are not run). Everything runs in a temporary directory, away from the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "marble", "components", "pipelines", "configs")


def run(cmd: list, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCES:
        item = REPO / name
        if item.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(item, src / name, symlinks=True, ignore=ignore)
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(item, src / name)
    wheels = tmp / "dist"
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", "-q", "--no-build-isolation", "--no-deps", "--no-index", "-w", wheels, src], tmp)
    (wheel,) = wheels.glob("marble-*.whl")

    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    own_site = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp)
    (Path(own_site.stdout.strip()) / "dev-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", wheel], tmp)
    work = tmp / "elsewhere"
    work.mkdir()
    return {"wheel": wheel, "python": python, "marble": env_dir / "bin" / "marble", "cwd": work}


def test_wheel_carries_the_shipped_configs_as_files(installed):
    import zipfile

    names = zipfile.ZipFile(installed["wheel"]).namelist()
    shipped = sorted(n for n in names if n.startswith("marble/configs/"))
    assert shipped == sorted(f"marble/configs/{p.name}" for p in (REPO / "configs").glob("*.yaml"))


def test_installed_marble_validates_its_shipped_configs_by_name(installed):
    out = run([installed["marble"], "config", "validate", "tiny", "sd35m-marble"], installed["cwd"])
    assert "tiny: OK" in out.stdout and "sd35m-marble: OK" in out.stdout


def test_installed_marble_names_the_shipped_configs_when_a_file_is_missing(installed):
    out = run([installed["marble"], "config", "validate", "nope.yaml"], installed["cwd"], check=False)
    assert out.returncode == 2
    assert "nope.yaml: config file not found" in out.stderr and "sd35m-marble" in out.stderr


def test_installed_pipeline_is_the_wheel_and_defaults_to_the_shipped_tiny_config(installed):
    code = (
        "import marble; from pipelines.marble_pipeline import default_config_path, default_config;"
        "print(marble.__file__); print(default_config_path()); print(default_config().model.pretrained)"
    )
    out = run([installed["python"], "-c", code], installed["cwd"])
    module, config, pretrained = (Path(s) for s in out.stdout.split())
    venv_dir = installed["python"].parents[1]
    assert venv_dir in module.parents and REPO not in module.resolve().parents
    assert config.parent.name == "configs" and venv_dir in config.parents
    assert str(pretrained) == "tiny"


@pytest.mark.slow  # over 10 s on the 2-core machine: `make test-slow`
def test_installed_bench_says_it_needs_a_checkout(installed):
    out = run([installed["marble"], "bench", "balancer_overhead"], installed["cwd"], check=False)
    assert out.returncode == 2
    assert "source checkout" in out.stderr and "Traceback" not in out.stderr
