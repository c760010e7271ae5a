"""Velocity prediction, deterministic CFG-free Euler sampling on the flow, and VAE decoding (SD3).

The timestep grid comes from diffusers' `FlowMatchEulerDiscreteScheduler` (shifted sigmas, SD3's
convention), so rollouts follow the same schedule as `StableDiffusion3Pipeline`.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

from marble.models.text import PromptEmbeddings


def sigma_grid(num_steps: int, shift: float) -> Tensor:
    """The sampling grid t_0 = 1 > t_1 > ... > t_{S-1} > 0 of an S-step SD3 Euler sampler, [S] float32."""
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    return sched.sigmas[:-1].to(torch.float32).clone()  # the last sigma (0) is the end point, not a step


def predict_velocity(transformer, latents: Tensor, t: Tensor, emb: PromptEmbeddings) -> Tensor:
    """Flow velocity v(x_t, t) [N, C, h, w]; t in (0, 1], [N] (SD3 takes timesteps as t x 1000)."""
    return transformer(
        hidden_states=latents,
        encoder_hidden_states=emb.prompt_embeds.to(latents.dtype),
        pooled_projections=emb.pooled.to(latents.dtype),
        timestep=t.to(latents.dtype) * 1000.0,
        return_dict=False,
    )[0]


def initial_noise(latent_shape: tuple[int, ...], generator, device="cpu") -> Tensor:
    """Noise [N, *latent_shape]; `generator` is one torch.Generator or one per sample (reproducible per image)."""
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    noise = torch.stack([torch.randn(latent_shape, generator=g) for g in gens])
    return noise.to(device)


@torch.no_grad()
def sample_latents(
    transformer,
    emb: PromptEmbeddings,
    *,
    num_steps: int,
    shift: float,
    latent_shape: tuple[int, ...],
    generator,
) -> Tensor:
    """Clean latents x0 [N, C, h, w] from a deterministic, CFG-free Euler solve of the flow ODE, t = 1 -> 0.

    `generator` is one generator per sample (or a single one when N == 1). CFG-free because the policy
    DiffusionNFT trains is the guidance-free one (docs/algorithm.md §2; `sampling.guidance_scale`).
    """
    n = len(emb)
    gens = generator if isinstance(generator, (list, tuple)) else [generator] * 1
    if len(gens) not in (1, n):
        raise ValueError(f"got {len(gens)} generators for {n} samples")
    device = next(transformer.parameters()).device
    dtype = next(transformer.parameters()).dtype
    if len(gens) == n:
        x = initial_noise(latent_shape, gens, device)
    else:
        x = torch.randn((n, *latent_shape), generator=gens[0]).to(device)
    x = x.to(dtype)
    grid = sigma_grid(num_steps, shift).to(device)  # [S]
    emb = emb.to(device)
    for i in range(num_steps):
        t = grid[i]
        t_next = grid[i + 1] if i + 1 < num_steps else torch.zeros((), device=device)
        tt = t.expand(n)
        v = predict_velocity(transformer, x, tt, emb)
        x = x + (t_next - t).to(x.dtype) * v  # Euler step; dt < 0
    return x


@torch.no_grad()
def decode_latents(vae, latents: Tensor) -> Tensor:
    """Images [N, 3, H, W] in [0, 1] (SD3's latent scaling and shift undone first)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(vae.dtype) / vae.config.scaling_factor + shift
    image = vae.decode(z, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)
