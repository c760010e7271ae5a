"""Shared fixtures: the tiny world's config and its loaded pipeline, and a guard on the T5 length.

The tiny model of configs/tiny.yaml is built once per machine into `<repo>/.cache/marble` (keyed by
its config hash; the demo and the tests share it, and a second run reuses it).

The guard: the tiny model is pretrained at the T5 length of its config (`model.max_sequence_length`,
32) and loses its conditioning when sampled at another (the stock pipeline's default is 256). Every
test that encodes a prompt through a saved tiny model therefore checks that the length it encodes at is
the one the model was built with, so any sampling path that forgets to pass the config's length fails
the suite wherever it is exercised (rollouts, evaluation, benchmarks, stock pipeline calls).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from marble.config import MarbleConfig
from marble.configio import load_config

REPO = Path(__file__).resolve().parents[1]
TINY_TEST_OVERRIDES = [f"model.cache_dir={REPO / '.cache' / 'marble'}"]


@pytest.fixture(scope="session")
def tiny_config() -> MarbleConfig:
    return load_config(REPO / "configs" / "tiny.yaml", TINY_TEST_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_config):
    from marble.models.loading import load_pipeline

    return load_pipeline(tiny_config.model)


def _built_length(pipe) -> int | None:
    """The T5 length a saved tiny model was pretrained at (its build record), None for other models."""
    from marble.models.tiny import BUILD_INFO

    info = Path(str(getattr(pipe, "name_or_path", "") or "")) / BUILD_INFO
    if not info.is_file():
        return None
    return json.loads(info.read_text()).get("max_sequence_length")


@pytest.fixture(autouse=True, scope="session")
def t5_length_is_the_built_length():
    from diffusers import StableDiffusion3Pipeline

    original = StableDiffusion3Pipeline._get_t5_prompt_embeds

    def checked(self, *args, max_sequence_length: int = 256, **kwargs):
        built = _built_length(self)
        assert built is None or max_sequence_length == built, (
            f"T5 prompt encoding at max_sequence_length={max_sequence_length}, but this tiny model was "
            f"pretrained at {built}: pass the config's model.max_sequence_length"
        )
        return original(self, *args, max_sequence_length=max_sequence_length, **kwargs)

    StableDiffusion3Pipeline._get_t5_prompt_embeds = checked
    yield
    StableDiffusion3Pipeline._get_t5_prompt_embeds = original


# ------------------------------------------------------------------ the one-time tiny-model build
# On a fresh clone the tiny model is not built yet and the build takes minutes. It starts in a
# background process as soon as the tests are collected, and the tests marked `tiny_model` (the
# modules that load it) run last: the other tests run meanwhile. A test that needs the
# model before it is ready waits on the builder's lock (`marble.models.tiny.ensure_tiny_model`), so a
# missing mark costs time, never correctness; a failed background build is repeated in the test that
# needs it, which then shows the error.
_BACKGROUND_BUILD: dict = {}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("tiny_model") is not None)  # stable: order kept


def pytest_collection_finish(session):
    if session.config.option.collectonly or not any(
        i.get_closest_marker("tiny_model") for i in session.items
    ):
        return
    import os
    import subprocess
    import sys

    from marble.models.tiny import BUILD_INFO, tiny_model_dir

    model_cfg = load_config(REPO / "configs" / "tiny.yaml", TINY_TEST_OVERRIDES).model
    if (tiny_model_dir(model_cfg) / BUILD_INFO).is_file():
        return
    log_path = Path(model_cfg.cache_dir) / "background-build.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    overrides = [arg for item in TINY_TEST_OVERRIDES for arg in ("--set", item)]
    # The build runs on two threads (marble.models.tiny.BUILD_THREADS) beside this process's tests, at a
    # lower priority (what it computes does not depend on it). At equal priority, beside a one-thread
    # CPU load on this 2-core machine, a VAE step took 0.69 s instead of 0.21 s and the load ran 27%
    # slower; at nice 10, 0.25 s and 5% slower (short runs; OMP_WAIT_POLICY=PASSIVE helped less and
    # made the build 49% slower once alone).
    with open(log_path, "w") as log:
        _BACKGROUND_BUILD["proc"] = subprocess.Popen(
            [sys.executable, "-m", "marble.cli", "tiny-model", "-c", str(REPO / "configs" / "tiny.yaml"), *overrides],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
            preexec_fn=(lambda: os.nice(10)) if hasattr(os, "nice") else None,
        )  # fmt: skip
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"building the tiny model in the background (log: {log_path})")


def pytest_sessionfinish(session):
    import signal

    proc = _BACKGROUND_BUILD.pop("proc", None)
    if proc is not None and proc.poll() is None:  # no test waited for it: stop it cleanly (its staging
        proc.send_signal(signal.SIGINT)  # directory is removed on KeyboardInterrupt)
        proc.wait()
