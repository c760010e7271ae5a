"""Shared fixtures: the tiny world's config and its loaded pipeline.

The tiny model of configs/tiny.yaml is built once per machine into `<repo>/.cache/marble` (keyed by
its config hash; the demo and the tests share it, and a second run reuses it).
"""

from __future__ import annotations

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
