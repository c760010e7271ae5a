"""The pipeline images and the one lock file they share with the dev install (no Docker daemon here:
the Dockerfiles, the lock and `make images` are checked as text, against pyproject.toml)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.cuda")
LOCK = REPO / "requirements.lock"
TORCH_BUILDS = {"torch", "torchvision", "triton"}


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (REPO / "dockerfiles" / dockerfile).read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.MULTILINE)]


def locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of every pin in requirements.lock."""
    pins = {}
    for block in re.split(r"\n(?=\S)", LOCK.read_text()):
        head = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", block)
        if head:
            pins[canonicalize_name(head[1])] = (head[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return pins


def makefile_var(name: str) -> str:
    return re.search(rf"^{name} [:?]?= (.*)$", (REPO / "Makefile").read_text(), re.MULTILINE)[1].strip()


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_base_image_is_pinned_by_digest(dockerfile):
    bases = [args for op, args in instructions(dockerfile) if op == "FROM"]
    assert bases
    for base in bases:
        assert re.fullmatch(r"[\w./:-]+@sha256:[0-9a-f]{64}", base.split()[0]), base


def test_both_images_share_one_base():
    bases = {
        dockerfile: [a for op, a in instructions(dockerfile) if op == "FROM"] for dockerfile in DOCKERFILES
    }
    assert len({tuple(b) for b in bases.values()}) == 1, bases


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_image_runs_as_a_numeric_non_root_user(dockerfile):
    steps = instructions(dockerfile)
    users = [i for i, (op, _) in enumerate(steps) if op == "USER"]
    assert users, f"{dockerfile}: no USER"
    uid = steps[users[-1]][1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, uid
    assert all(op != "RUN" for op, _ in steps[users[-1] :]), "nothing may run as root after USER"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_image_installs_torch_first_then_the_lock(dockerfile):
    steps = instructions(dockerfile)
    runs = [args for op, args in steps if op == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "TORCH_INDEX_URL" in r)
    lock_step = next(i for i, r in enumerate(runs) if "-c requirements.lock" in r)
    assert torch_step < lock_step
    assert ("COPY", "requirements.lock pyproject.toml README.md ./") in steps
    ignore = (REPO / "dockerfiles" / f"{dockerfile}.dockerignore").read_text().splitlines()
    assert "!requirements.lock" in ignore


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_image_has_what_the_paper_config_needs(dockerfile):
    """HPSv2.1 needs open_clip (extra `hps`, with a torchvision matching torch); the OCR reward of the
    paper's config is TrOCR, which is plain transformers (a core dependency)."""
    from marble.configio import load_config

    cfg = load_config(REPO / "configs" / "sd35m-marble.yaml")
    kinds = {r.kind for r in cfg.rewards}
    assert {"hpsv21", "ocr"} <= kinds
    assert {r.backend for r in cfg.rewards if r.kind == "ocr"} == {"trocr"}
    extras = next(a for op, a in instructions(dockerfile) if op == "ARG" and a.startswith("EXTRAS="))
    assert "hps" in extras.split("=", 1)[1].split(",")
    torch_spec = next(a for op, a in instructions(dockerfile) if op == "ARG" and a.startswith("TORCH_SPEC="))
    assert "torchvision==" in torch_spec
    assert "open_clip" in next(
        a for op, a in instructions(dockerfile) if op == "RUN" and "import marble" in a
    )


def test_make_images_builds_for_amd64():
    dry = subprocess.run(
        ["make", "-n", "-C", str(REPO), "images", f"STAMP={REPO / 'Makefile'}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "docker buildx build --platform linux/amd64 -f dockerfiles/Dockerfile.$role" in dry


def test_lock_pins_every_dependency_of_the_locked_extras_with_hashes():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = makefile_var("LOCK_EXTRAS").split()
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for extra in extras for r in project["optional-dependencies"][extra]]
    pins = locked()
    for req in wanted:
        name = canonicalize_name(req.name)
        if name in TORCH_BUILDS:
            continue
        assert name in pins, f"requirements.lock has no pin for {req}: run `make lock`"
        assert req.specifier.contains(pins[name][0], prereleases=True), f"{req} vs locked {pins[name][0]}"
    assert all(hashes for _, hashes in pins.values())


def test_lock_leaves_every_torch_build_to_the_installation():
    """Each install puts its own torch first (local CPU wheel, CUDA index): the lock must never name one,
    nor the CUDA libraries a CUDA build of torch pulls in."""
    names = set(locked())
    assert not names & TORCH_BUILDS
    assert not {n for n in names if n.startswith("nvidia-")}


def test_dev_install_and_images_draw_from_the_locked_extras():
    extras = set(makefile_var("LOCK_EXTRAS").split())
    assert set(makefile_var("EXTRAS").split(",")) <= extras
    for dockerfile in DOCKERFILES:
        arg = next(a for op, a in instructions(dockerfile) if op == "ARG" and a.startswith("EXTRAS="))
        assert set(arg.split("=", 1)[1].split(",")) <= extras, dockerfile
