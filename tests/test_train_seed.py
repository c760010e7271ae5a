"""The trained adapter's initial weights are a function of `train.seed` alone: the same whether loading
the base model drew from torch's global random stream (the first run, which builds and caches the tiny
model) or not (every later run, which loads it from the cache)."""

from __future__ import annotations

import pytest
import torch
from _train_helpers import train_config

from marble.data.prepare import prepare_prompts
from marble.models import loading, lora
from marble.train.trainer import Trainer

pytestmark = pytest.mark.tiny_model  # loads the built tiny model (tests/conftest.py)


def _initial_adapter(cfg, prompts, out) -> dict[str, torch.Tensor]:
    tr = Trainer(cfg, prompts, out)
    tr.setup()
    try:
        return {k: v.clone() for k, v in lora.adapter_state_dict(tr.model, "default").items()}
    finally:
        tr.cleanup()


def test_lora_init_depends_on_the_seed_not_on_what_loading_drew(tiny_config, tmp_path, monkeypatch):
    cfg = train_config(tiny_config)
    prompts = tmp_path / "prompts"
    prepare_prompts(cfg, prompts)
    cached = _initial_adapter(cfg, prompts, tmp_path / "cached")
    real_load = loading.load_pipeline

    def building_load(*args, **kwargs):
        torch.randn(4096)  # what a first run's model build draws before the adapters are added
        return real_load(*args, **kwargs)

    monkeypatch.setattr(loading, "load_pipeline", building_load)
    built = _initial_adapter(cfg, prompts, tmp_path / "built")
    assert cached.keys() == built.keys() and cached
    nonzero = [k for k in cached if cached[k].abs().sum() > 0]
    assert nonzero  # gaussian init: the A matrices are random, so the check can fail
    for k in cached:
        assert torch.equal(cached[k], built[k]), k
    other = _initial_adapter(train_config(tiny_config, train={"seed": 1}), prompts, tmp_path / "seed1")
    assert any(not torch.equal(cached[k], other[k]) for k in nonzero)  # the seed does choose it
