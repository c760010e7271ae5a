"""The tiny-model cache: keyed by config, built once, atomic against concurrent builders (no real build here)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from marble.config import ModelConfig, TinyModelConfig
from marble.models import tiny


def _fake_build(calls: list, delay: float = 0.0):
    def build(tiny_cfg, out_dir, max_sequence_length):
        calls.append(out_dir)
        time.sleep(delay)
        (out_dir / "model_index.json").write_text("{}")
        return {"fake": True}

    return build


def test_key_depends_on_the_tiny_config_and_build_version(monkeypatch):
    base = tiny.tiny_model_key(TinyModelConfig(), 32)
    assert base == tiny.tiny_model_key(TinyModelConfig(), 32)
    assert base != tiny.tiny_model_key(TinyModelConfig(vae_train_steps=1), 32)
    monkeypatch.setattr(tiny, "BUILD_VERSION", tiny.BUILD_VERSION + 1)
    assert base != tiny.tiny_model_key(TinyModelConfig(), 32)


def test_second_call_hits_the_cache(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(tiny, "build_tiny_pipeline", _fake_build(calls))
    cfg = ModelConfig(cache_dir=str(tmp_path))
    first = tiny.ensure_tiny_model(cfg)
    assert first.parent == tmp_path and first.name.startswith("tiny-")
    assert json.loads((first / tiny.BUILD_INFO).read_text()) == {"fake": True}
    assert tiny.ensure_tiny_model(cfg) == first and len(calls) == 1
    # nothing half-built is left beside it
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [first.name]


def test_failed_build_leaves_no_cache_entry(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(tiny, "build_tiny_pipeline", broken)
    with pytest.raises(RuntimeError, match="boom"):
        tiny.ensure_tiny_model(ModelConfig(cache_dir=str(tmp_path)))
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_builders_build_once(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(tiny, "build_tiny_pipeline", _fake_build(calls, delay=0.3))
    cfg = ModelConfig(cache_dir=str(tmp_path))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(tiny.ensure_tiny_model(cfg))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert len(calls) == 1  # the others waited on the lock, then found the finished build


def test_losing_the_rename_race_uses_the_winner(tmp_path, monkeypatch):
    """Without the lock (e.g. no fcntl), a second complete build must not replace or corrupt the first."""
    cfg = ModelConfig(cache_dir=str(tmp_path))
    target = tmp_path / f"tiny-{tiny.tiny_model_key(cfg.tiny, cfg.max_sequence_length)}"

    def build_while_another_wins(tiny_cfg, out_dir, max_sequence_length):
        target.mkdir()
        (target / "winner").write_text("1")
        (target / tiny.BUILD_INFO).write_text("{}")
        (out_dir / "loser").write_text("1")
        return {}

    monkeypatch.setattr(tiny, "build_tiny_pipeline", build_while_another_wins)
    assert tiny.ensure_tiny_model(cfg) == target
    assert (target / "winner").is_file() and not (target / "loser").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [target.name]


@pytest.mark.slow  # over 10 s on the 2-core machine: `make test-slow`
def test_tiny_build_is_deterministic_whatever_the_callers_thread_count(tmp_path):
    """Two builds of one config save byte-identical files (weights, tokenizers, configs) although the
    callers use different torch thread counts (CPU reductions split by thread: unpinned, 1 and 2 threads
    differed) and the tokenizer trainers iterate hash maps in a new order each time (uncanonicalised,
    four trainings of the CLIP tokenizer in one process gave four different vocabularies). The caller's
    thread count and random stream are left as they were."""
    import hashlib

    import torch

    from marble.config import TinyModelConfig
    from marble.models.tiny import build_tiny_pipeline
    from marble.threads import pinned_threads

    cfg = TinyModelConfig(
        vae_train_steps=4, pretrain_steps=3, pretrain_images=24, pretrain_batch_size=4, vae_batch_size=4
    )
    digests = []
    for threads in (1, 3):
        with pinned_threads(threads):
            out = tmp_path / f"t{threads}"
            stream = torch.get_rng_state()
            build_tiny_pipeline(cfg, out, max_sequence_length=32)
            assert torch.get_num_threads() == threads  # the caller's setting is restored
            assert torch.equal(torch.get_rng_state(), stream)  # and its random stream
        files = sorted(p for p in out.rglob("*") if p.is_file())
        assert {"tokenizer.json", "diffusion_pytorch_model.safetensors", "model.safetensors"} <= {
            p.name for p in files
        }
        digests.append({str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files})
    assert digests[0] == digests[1]


def test_cli_builds_the_tiny_model_once_and_prints_its_directory(tmp_path, monkeypatch, capsys):
    from marble.cli import main

    calls: list = []
    monkeypatch.setattr(tiny, "build_tiny_pipeline", _fake_build(calls))
    args = ["tiny-model", "-c", "tiny", "--set", f"model.cache_dir={tmp_path}"]
    assert main(args) == 0
    first = capsys.readouterr().out.strip()
    assert main(args) == 0 and capsys.readouterr().out.strip() == first and len(calls) == 1
    assert (tmp_path / first.rsplit("/", 1)[-1] / tiny.BUILD_INFO).is_file()


def test_cli_refuses_a_config_whose_model_is_not_tiny(tmp_path, capsys):
    from marble.cli import main

    assert main(["tiny-model", "-c", "sd35m-marble", "--set", f"model.cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained=" in err and "not the tiny model" in err
    assert list(tmp_path.iterdir()) == []


def test_object_weights_weigh_the_object_not_the_background():
    x = -torch.ones(2, 3, 8, 8)  # dark background
    x[0, :, 2:4, 2:4] = torch.tensor([0.8, -0.8, -0.8]).view(3, 1, 1)  # a red object, 4 pixels
    w = tiny.object_weights(x, 5.0)  # [2, 1, 8, 8]
    assert w.shape == (2, 1, 8, 8)
    assert w[0, 0, 2:4, 2:4].eq(5).all() and w[0].sum() == 64 - 4 + 4 * 5
    assert w[1].eq(1).all()  # no object
    assert tiny.object_weights(x, 1.0).eq(1).all()  # weight 1: plain MSE


def test_transformer_tells_its_tokens_positions_apart():
    """SD3's PatchEmbed spaces its sin-cos grid by (tokens per side) / pos_embed_max_size. With SD3's 96
    and the tiny 4 x 4 token grid every token's embedding had cosine >= 0.999 with every other's (the
    model could not tell left from right); one unit apart, opposite corners are clearly distinct."""
    from diffusers.models.embeddings import PatchEmbed

    cfg = TinyModelConfig()
    side = cfg.resolution // 8
    model = tiny.build_transformer(cfg)
    emb = torch.nn.functional.normalize(model.pos_embed.cropped_pos_embed(side, side)[0], dim=1)  # [16, D]
    cos = emb @ emb.T
    assert cos[0, 3] < 0.95 and cos[0, 12] < 0.95 and cos[0, 15] < 0.9, cos[0]
    # the same grid at SD3's maximum: the failure this guards against
    sd3 = PatchEmbed(side, side, 2, 16, model.inner_dim, pos_embed_max_size=96)
    old = torch.nn.functional.normalize(sd3.cropped_pos_embed(side, side)[0], dim=1)
    assert (old @ old.T).min() > 0.99
