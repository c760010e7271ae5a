"""The models package on the tiny world: build/cache/load, embeddings, LoRA adapters, export, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from marble.configio import validate_config
from marble.errors import MarbleError
from marble.models import lora
from marble.models.loading import load_pipeline, resolve_pretrained
from marble.models.sampling import decode_latents, predict_velocity, sample_latents, sigma_grid
from marble.models.text import TextEmbeddingCache, encode_prompts
from marble.models.tiny import BUILD_INFO, build_vae, decoded_brightness_std

pytestmark = pytest.mark.tiny_model  # loads the built tiny model (tests/conftest.py)

PROMPTS = ["a red circle", 'a sign that says "open"', "two small squares"]


@pytest.fixture(scope="module")
def emb(tiny_pipeline):
    return encode_prompts(tiny_pipeline, PROMPTS, 32)


def _inputs(n=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 16, 8, 8, generator=g), torch.tensor([0.3, 0.6, 0.95])[:n]


def test_tiny_model_is_saved_then_loaded_from_its_cache(tiny_config, tiny_pipeline):
    path, kwargs = resolve_pretrained(tiny_config.model)
    info = json.loads(Path(path, BUILD_INFO).read_text())
    assert kwargs == {} and (tiny_config.model.cache_dir in path)
    # the trained VAE's reconstructions follow their inputs; a random decoder's barely move (docs/library-notes.md)
    # Measured live (build stats of caches built by older code used another definition of this number):
    # std across synthetic images of the mean brightness of their reconstructions. Images vary (~0.11);
    # the trained VAE gives ~0.06, random initialisations 0.002-0.005 (their max is the bar, x10).
    trained = decoded_brightness_std(tiny_pipeline.vae, 64, torch.Generator().manual_seed(1), n=64)
    untrained = []
    for seed in range(3):
        torch.manual_seed(seed)
        untrained.append(
            decoded_brightness_std(build_vae().eval(), 64, torch.Generator().manual_seed(1), n=64)
        )
    assert trained > 10 * max(untrained), (trained, untrained)
    assert info["vae_loss_first_last"][1] < 0.5 * info["vae_loss_first_last"][0]
    assert info["vae_shift_factor"] is not None
    assert type(tiny_pipeline).__name__ == "StableDiffusion3Pipeline"
    assert not tiny_pipeline.transformer.training and not tiny_pipeline.text_encoder_3.training
    # a second resolve hits the cache (same directory, nothing rebuilt)
    assert resolve_pretrained(tiny_config.model)[0] == path


def test_missing_local_directory_is_a_clear_error(tiny_config, tmp_path):
    data = tiny_config.model_dump(mode="json")
    data["model"]["pretrained"] = str(tmp_path / "no-such-model")
    data["model"]["tiny"] = None
    with pytest.raises(MarbleError, match="no-such-model"):
        load_pipeline(validate_config(data).model)


def test_prompt_embeddings_are_deterministic_and_cached(tiny_pipeline, emb):
    again = encode_prompts(tiny_pipeline, PROMPTS, 32)
    assert torch.equal(emb.prompt_embeds, again.prompt_embeds) and torch.equal(emb.pooled, again.pooled)
    # CLIP padded to the T5 length + 1 (marble.models.tiny.clip_length), then T5's 32 tokens
    assert emb.prompt_embeds.shape[:2] == (3, 33 + 32) and emb.pooled.shape == (3, 64)
    cache = TextEmbeddingCache(tiny_pipeline, 32)
    got = cache.get([PROMPTS[1], PROMPTS[1], PROMPTS[0]])
    assert len(cache) == 2 and torch.equal(got.prompt_embeds[0], emb.prompt_embeds[1])


def test_sigma_grid_and_sampling(tiny_pipeline, emb):
    grid = sigma_grid(8, 3.0)
    assert grid.shape == (8,) and grid[0] == 1.0 and bool((grid[1:] < grid[:-1]).all()) and grid[-1] > 0
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    x = sample_latents(
        tiny_pipeline.transformer, emb, num_steps=4, shift=3.0, latent_shape=(16, 8, 8), generator=gens
    )
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    y = sample_latents(
        tiny_pipeline.transformer, emb, num_steps=4, shift=3.0, latent_shape=(16, 8, 8), generator=gens
    )
    assert torch.equal(x, y) and torch.isfinite(x).all()
    images = decode_latents(tiny_pipeline.vae, x)
    assert images.shape == (3, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    # decoded images depend on the latents
    assert images.mean(dim=(1, 2, 3)).std() > 1e-4


def test_lora_adapters_old_copy_blend_and_reference(tiny_config, emb):
    pipe = load_pipeline(tiny_config.model)
    x, t = _inputs()
    base = predict_velocity(pipe.transformer, x, t, emb)
    model = lora.add_lora_adapters(pipe.transformer, tiny_config.lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n and "lora_" in n for n in trainable)
    old, new = lora.adapter_state_dict(model, "old"), lora.adapter_state_dict(model, "default")
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.default" in n:
                p.normal_(0, 0.1)
    new = lora.adapter_state_dict(model, "default")
    lora.blend_old_adapter(model, 0.3)
    blended = lora.adapter_state_dict(model, "old")
    for k in old:  # θ_old ← 0.3 θ_old + 0.7 θ, exactly as torch computes it
        assert torch.equal(blended[k], old[k].clone().mul_(0.3).add_(new[k], alpha=0.7))
    with model.disable_adapter():
        assert torch.equal(predict_velocity(model, x, t, emb), base)
    assert (predict_velocity(model, x, t, emb) - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="eta"):
        lora.blend_old_adapter(model, 1.5)


def test_adapter_switch_does_what_peft_model_level_calls_do(tiny_config, emb):
    """The switch on the LoRA layers gives the outputs and trainable flags of peft's model-level
    `set_adapter` / `disable_adapter`, and restores the training state after each block."""
    pipe = load_pipeline(tiny_config.model)
    x, t = _inputs()
    model = lora.add_lora_adapters(pipe.transformer, tiny_config.lora)
    with torch.no_grad():  # the two adapters and the base all differ
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    grads = lambda: {n: p.requires_grad for n, p in model.named_parameters()}  # noqa: E731
    training = grads()
    switch = lora.AdapterSwitch(model)
    with torch.no_grad():
        v_default = predict_velocity(model, x, t, emb)
        with switch.active("old"):
            v_old, flags_old = predict_velocity(model, x, t, emb), grads()
        assert grads() == training and torch.equal(predict_velocity(model, x, t, emb), v_default)
        with switch.disabled():
            v_ref, flags_ref = predict_velocity(model, x, t, emb), grads()
        assert grads() == training
        model.set_adapter("old")
        assert torch.equal(predict_velocity(model, x, t, emb), v_old) and grads() == flags_old
        model.set_adapter("default")
        with model.disable_adapter():
            assert torch.equal(predict_velocity(model, x, t, emb), v_ref) and grads() == flags_ref
    assert not torch.equal(v_old, v_default) and not torch.equal(v_ref, v_default)
    assert any(flags_old[n] for n in flags_old if ".old." in n) and not any(flags_ref.values())
    with pytest.raises(ValueError, match="no peft adapter layers"):
        lora.AdapterSwitch(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_exported_adapter_loads_in_stock_diffusers_and_reproduces_outputs(tiny_config, emb, tmp_path):
    pipe = load_pipeline(tiny_config.model)
    x, t = _inputs()
    base = predict_velocity(pipe.transformer, x, t, emb)
    model = lora.add_lora_adapters(pipe.transformer, tiny_config.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.default" in n:
                p.normal_(0, 0.1)
    trained = predict_velocity(model, x, t, emb)
    out = lora.export_adapter(model, tmp_path / "adapter")
    assert (out / lora.ADAPTER_FILE).is_file() and not list(tmp_path.glob(".adapter.*"))
    fresh = load_pipeline(tiny_config.model)
    fresh.load_lora_weights(str(out))  # the stock diffusers call a user makes
    loaded = predict_velocity(fresh.transformer, x, t, emb)
    assert (loaded - base).abs().max() > 1e-3  # the adapter changes outputs ...
    torch.testing.assert_close(
        loaded, trained, rtol=1e-5, atol=1e-6
    )  # ... to the trained model's, alpha kept
    with pytest.raises(MarbleError, match="not found"):
        lora.load_adapter_into_pipeline(fresh, tmp_path / "nothing")
