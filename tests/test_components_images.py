"""Component images: pinned in one place, rewritable by `make images`, found by the container executor."""

from __future__ import annotations

import configparser
import shutil
from pathlib import Path

import pytest
import yaml

import components
from pipelines import images

REPO = Path(__file__).resolve().parents[1]
STAGE_MODULES = (
    "validate_config",
    "prepare_prompts",
    "cache_reward_models",
    "train",
    "evaluate",
    "gate",
    "promote",
    "record_candidate",
    "finalize_run",
    "fingerprint_inputs",
)
PUSHED = "registry.example.com/team/marble-cpu@sha256:" + "ab" * 32


def test_pin_rewrites_the_reference_here_and_in_the_manifests(tmp_path):
    copy, manifest = tmp_path / "images.py", tmp_path / "kustomization.yaml"
    shutil.copyfile(REPO / "pipelines" / "images.py", copy)
    shutil.copyfile(images.MANIFEST_IMAGES, manifest)
    images.pin("cpu", PUSHED, path=copy, manifest=manifest)
    text = copy.read_text()
    assert f'CPU_IMAGE = "{PUSHED}"' in text
    assert f'CUDA_IMAGE = "{images.CUDA_IMAGE}"' in text
    entries = {
        e["name"]: f"{e['newName']}@{e['digest']}" for e in yaml.safe_load(manifest.read_text())["images"]
    }
    assert entries == {"marble-cpu": PUSHED, "marble-cuda": images.CUDA_IMAGE}


def test_manifests_pin_the_same_images_as_the_pipeline():
    entries = yaml.safe_load(images.MANIFEST_IMAGES.read_text())["images"]
    assert {e["name"]: f"{e['newName']}@{e['digest']}" for e in entries} == {
        f"marble-{role}": ref for role, ref in images.IMAGES.items()
    }


@pytest.mark.parametrize(
    "reference",
    [
        "registry.example.com/team/marble-cpu:latest",
        "registry.example.com/team/marble-cpu",
        "registry.example.com/team/marble-cpu@sha256:" + "0" * 64,  # the placeholder itself
        "registry.example.com/team/marble-cpu@sha256:abc",
    ],
)
def test_pin_refuses_undigested_or_placeholder_references(tmp_path, reference):
    copy = tmp_path / "images.py"
    shutil.copyfile(REPO / "pipelines" / "images.py", copy)
    with pytest.raises(ValueError, match="sha256"):
        images.pin("cpu", reference, path=copy, manifest=None)
    assert copy.read_text() == (REPO / "pipelines" / "images.py").read_text()


def test_every_image_is_a_digest_reference_and_placeholders_are_reported():
    for role, ref in images.IMAGES.items():
        assert images.is_pinned(ref), (role, ref)
    assert set(images.placeholder_images()) == {
        r for r, ref in images.IMAGES.items() if images.is_placeholder(ref)
    }
    assert not images.is_pinned("registry.example.com/team/marble-cpu:1.0")


def test_kfp_config_ini_names_every_component_function():
    """The containerized executor finds a component through kfp_config.ini in the image's WORKDIR."""
    parser = configparser.ConfigParser()
    parser.optionxform = str
    parser.read(REPO / "dockerfiles" / "kfp_config.ini")
    listed = dict(parser["Components"])
    for module in STAGE_MODULES:
        component = __import__(f"components.{module}", fromlist=["component"]).component
        func_name = component.python_func.__name__
        assert (REPO / listed[func_name]).is_file(), listed[func_name]
        assert listed[func_name] == f"components/{module}.py"
    assert len(listed) == len(STAGE_MODULES)
    assert components.__doc__


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_component_bodies_import_heavy_libraries_inside(module):
    """Compiling needs only kfp: no module-level import of torch, diffusers or the stage code."""
    source = (REPO / "components" / f"{module}.py").read_text()
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert all(not line.startswith(("import torch", "from marble", "import marble")) for line in top_level), (
        top_level
    )


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfiles_copy_what_the_components_need(dockerfile):
    """No Docker daemon here: check what can be checked statically (sources exist, base not :latest,
    kfp_config.ini lands in the WORKDIR the executor reads it from)."""
    lines = [line.strip() for line in (REPO / "dockerfiles" / dockerfile).read_text().splitlines()]
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert bases and all(":" in b and ":latest" not in b for b in bases), bases
    copies = [line.split()[1:] for line in lines if line.startswith("COPY ")]
    for *sources, _dest in copies:
        for src in sources:
            assert (REPO / src).exists(), f"{dockerfile}: COPY source {src} does not exist"
    assert ["dockerfiles/kfp_config.ini", "kfp_config.ini"] in copies
    assert "WORKDIR /app" in lines
    for package in ("marble", "components", "pipelines", "configs"):
        assert [package, package] in copies
    ignore = (REPO / "dockerfiles" / f"{dockerfile}.dockerignore").read_text().splitlines()
    for package in ("marble/", "components/", "pipelines/", "configs/"):
        assert f"!{package}" in ignore


def test_no_repo_directory_shadows_the_docker_sdk():
    """kfp.local imports `docker` unconditionally; a top-level `docker/` folder in the working directory
    becomes a namespace package that shadows the SDK (or its absence) and breaks every local run started
    with the repo root on sys.path (`python -m pytest`). Hence the Dockerfiles live in dockerfiles/."""
    assert not (REPO / "docker").exists()
