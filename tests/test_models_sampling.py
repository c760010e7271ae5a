"""Our Euler sampler against the stock StableDiffusion3Pipeline (same noise -> same latents), and loading options."""

from __future__ import annotations

import pytest
import torch

from marble.errors import MarbleError
from marble.models.loading import resolve_pretrained
from marble.models.sampling import decode_latents, sample_latents
from marble.models.text import PromptEmbeddings, encode_prompts

pytestmark = pytest.mark.tiny_model  # loads the built tiny model (tests/conftest.py)

PROMPTS = ["a blue ring", 'a poster with the word "stop"']


def _pipeline_latents(pipe, emb: PromptEmbeddings, noise, steps):
    out = pipe(
        prompt_embeds=emb.prompt_embeds,
        pooled_prompt_embeds=emb.pooled,
        num_inference_steps=steps,
        guidance_scale=1.0,  # CFG-free, as the rollouts
        latents=noise.clone(),
        output_type="latent",
        height=64,
        width=64,
    )
    return out.images  # [N, C, h, w], the clean latents before VAE scaling


def test_sampler_matches_the_stock_pipeline(tiny_pipeline, tiny_config):
    emb = encode_prompts(tiny_pipeline, PROMPTS, tiny_config.model.max_sequence_length)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    ours = sample_latents(
        tiny_pipeline.transformer, emb, num_steps=5, shift=3.0, latent_shape=(16, 8, 8), generator=gens
    )
    noise = torch.stack(
        [torch.randn((16, 8, 8), generator=torch.Generator().manual_seed(7 + i)) for i in range(2)]
    )
    theirs = _pipeline_latents(tiny_pipeline, emb, noise, steps=5)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    # different noise gives different images: the rollout depends on the generator
    other = sample_latents(
        tiny_pipeline.transformer,
        emb,
        num_steps=5,
        shift=3.0,
        latent_shape=(16, 8, 8),
        generator=[torch.Generator().manual_seed(100 + i) for i in range(2)],
    )
    assert (other - ours).abs().max() > 1e-3
    assert (
        decode_latents(tiny_pipeline.vae, other) - decode_latents(tiny_pipeline.vae, ours)
    ).abs().max() > 1e-3


def test_hub_ids_are_pinned_and_offline_means_local_files_only(tiny_config):
    cfg = tiny_config.model.model_copy(
        update={
            "pretrained": "stabilityai/stable-diffusion-3.5-medium",
            "revision": "abc123",
            "offline": True,
        }
    )
    source, kwargs = resolve_pretrained(cfg)
    assert source == "stabilityai/stable-diffusion-3.5-medium"
    assert kwargs == {"revision": "abc123", "local_files_only": True}


def test_a_hub_id_missing_offline_is_a_clear_error(tiny_config, tmp_path, monkeypatch):
    from marble.models.loading import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test (load_pipeline sets it to 1)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache: nothing can be found locally
    cfg = tiny_config.model.model_copy(
        update={"pretrained": "nobody/no-such-sd3", "offline": True, "tiny": None}
    )
    with pytest.raises(MarbleError, match="nobody/no-such-sd3"):
        load_pipeline(cfg)


def test_the_stock_pipeline_at_its_default_t5_length_fails_the_guard(tiny_pipeline, tiny_config):
    """tests/conftest.py refuses T5 encodings of a tiny model at a length other than the one it was
    pretrained at, so a sampling path that omits the config's max_sequence_length (the stock pipeline
    then pads to 256) fails whichever test runs it."""
    kwargs = {
        "prompt": ["a red circle"],
        "num_inference_steps": 1,
        "height": 64,
        "width": 64,
        "output_type": "latent",
    }
    with pytest.raises(AssertionError, match="max_sequence_length=256"):
        tiny_pipeline(**kwargs)
    out = tiny_pipeline(**kwargs, max_sequence_length=tiny_config.model.max_sequence_length)
    assert out.images.shape == (1, 16, 8, 8)
