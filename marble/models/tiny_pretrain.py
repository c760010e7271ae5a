"""Pretraining the tiny model so that it follows its prompts (colour and position per prompt).

Flow matching (x_t = (1-t) x0 + t ε, target ε − x0, SD3's objective) on images rendered from the tiny
world's grammar, trained jointly: the transformer AND the three text encoders (random frozen encoders
barely tell colour words apart: pooled embeddings of "a red circle" and "a blue circle" are 0.91
cosine-similar, docs/tiny-world.md). What makes it fit in the build budget on 2 CPU cores: the images
are rendered once and VAE-encoded once, then every step trains on cached latents; the prompts go
through the pipeline's own `encode_prompt` at the T5 length the model is sampled at (a model trained
at one length and sampled at another loses its conditioning).

The colour x shape pairs of HELD_OUT_COMBOS are never rendered here, so the conditioning measured on
them (`marble.eval.conditioning`) is measured on combinations the model has not seen.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from marble.config import TinyModelConfig
from marble.data.tiny_world import (
    HELD_OUT_COMBOS,
    PALETTE,
    SHAPES,
    color_grammar,
    general_grammar,
    text_grammar,
)
from marble.models.tiny_render import render_batch

FAMILY_SHARES = {"color": 0.5, "general": 0.25, "text": 0.25}
"""[ours] Share of each family among the pretraining images: colour prompts carry both attributes the
model must learn (colour and position), the others only keep general and text prompts looking right."""


PRETRAIN_WARMUP_STEPS = 50
"""Linear learning-rate warm-up: the text encoders and the transformer start random, and the first steps'
gradients are the largest."""


def pretraining_grammar() -> dict[str, list[str]]:
    """Every prompt pretraining may render, per family (colour prompts without HELD_OUT_COMBOS)."""
    seen = [(c, s) for c in PALETTE for s in SHAPES if (c, s) not in HELD_OUT_COMBOS]
    return {"color": color_grammar(seen), "general": general_grammar(), "text": text_grammar()}


def sample_pretraining_prompts(n: int, generator: torch.Generator) -> list[str]:
    """`n` prompts drawn from `pretraining_grammar` with FAMILY_SHARES (uniform within a family)."""
    grammar = pretraining_grammar()
    families = list(FAMILY_SHARES)
    shares = torch.tensor([FAMILY_SHARES[f] for f in families], dtype=torch.float64)
    which = torch.multinomial(shares, n, replacement=True, generator=generator)  # [n]
    out = []
    for f in which.tolist():
        pool = grammar[families[f]]
        out.append(pool[int(torch.randint(len(pool), (), generator=generator))])
    return out


@torch.no_grad()
def encode_dataset(vae, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Latents `[N, C, h, w]` of images `[N, 3, H, W]` in [0, 1]: the posterior MEAN, with SD3's
    shift/scale applied as the pipeline applies them (a sampled posterior would add noise the sampler
    must then learn to reproduce)."""
    shift = vae.config.shift_factor or 0.0
    out = []
    for s in range(0, images.shape[0], batch_size):
        z = vae.encode(images[s : s + batch_size] * 2 - 1).latent_dist.mean
        out.append((z - shift) * vae.config.scaling_factor)
    return torch.cat(out)


def shifted_timesteps(n: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """`[n]` training times t in (0, 1): logit-normal u mapped by the sampler's shift, t = s u / (1 + (s-1) u),
    so training sees the high-noise times where the sampler spends its steps and where colour and
    layout are decided."""
    u = torch.sigmoid(torch.randn(n, generator=generator))
    return shift * u / (1 + (shift - 1) * u)


def _trainable(pipe) -> list[torch.nn.Module]:
    return [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]


def pretrain(
    pipe,
    tiny: TinyModelConfig,
    max_sequence_length: int,
    generator: torch.Generator,
    progress: tqdm,
    shift: float = 3.0,
) -> dict[str, float]:
    """Render, encode, then train transformer + text encoders for `tiny.pretrain_steps`; returns stats.

    A linear warm-up over the first PRETRAIN_WARMUP_STEPS, then cosine decay to 0 over the steps; the
    modules are left in eval mode.
    """
    prompts = sample_pretraining_prompts(tiny.pretrain_images, generator)
    latents = encode_dataset(pipe.vae, render_batch(prompts, tiny.resolution, generator))  # [N, C, h, w]
    modules = _trainable(pipe)
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
        m.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=tiny.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / PRETRAIN_WARMUP_STEPS)
            * 0.5
            * (1 + math.cos(math.pi * min(s, tiny.pretrain_steps) / tiny.pretrain_steps))
        ),
    )
    losses = []
    for _ in range(tiny.pretrain_steps):
        idx = torch.randint(len(prompts), (tiny.pretrain_batch_size,), generator=generator)  # [B]
        loss = flow_matching_loss(
            pipe, [prompts[i] for i in idx.tolist()], latents[idx], max_sequence_length, shift, generator
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
        progress.update()
    for m in modules:
        m.eval()
        m.requires_grad_(False)
    tail = losses[-max(1, len(losses) // 10) :]
    return {"images": len(prompts), "loss_first": losses[0], "loss_last_tenth": sum(tail) / len(tail)}


def flow_matching_loss(
    pipe,
    prompts: list[str],
    x0: torch.Tensor,
    max_sequence_length: int,
    shift: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """SD3's flow-matching MSE for clean latents `x0` `[B, C, h, w]` of `prompts`, through the pipeline's
    own prompt encoding (with gradients, so the text encoders learn too)."""
    from marble.models.sampling import predict_velocity
    from marble.models.text import PromptEmbeddings

    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=x0.device,
        do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
    )  # fmt: skip
    t = shifted_timesteps(x0.shape[0], shift, generator)  # [B]
    eps = torch.randn(x0.shape, generator=generator)
    tt = t.view(-1, 1, 1, 1)
    v = predict_velocity(
        pipe.transformer, (1 - tt) * x0 + tt * eps, t, PromptEmbeddings(prompt_embeds, pooled)
    )
    return torch.nn.functional.mse_loss(v, eps - x0)
