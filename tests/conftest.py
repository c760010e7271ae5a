"""Shared fixtures: the tiny world's config and its loaded pipeline.

The tiny model is built once per machine into `<repo>/.cache/marble-test` (keyed by its config hash, so
a second test run reuses it). Tests use a faster VAE training than configs/tiny.yaml (100 steps instead
of 400): enough for decoded images to depend on latents, which is all the tests need.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from marble.config import MarbleConfig
from marble.configio import load_config

REPO = Path(__file__).resolve().parents[1]
TEST_CACHE = REPO / ".cache" / "marble-test"
TINY_TEST_OVERRIDES = [f"model.cache_dir={TEST_CACHE}", "model.tiny.vae_train_steps=100"]


@pytest.fixture(scope="session")
def tiny_config() -> MarbleConfig:
    return load_config(REPO / "configs" / "tiny.yaml", TINY_TEST_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_config):
    from marble.models.loading import load_pipeline

    return load_pipeline(tiny_config.model)
