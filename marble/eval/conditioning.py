"""How well a tiny-world pipeline follows its prompts: colour and position accuracy on held-out prompts.

The prompts are the tiny world's colour prompts for the colour x shape pairs never rendered in
pretraining (HELD_OUT_COMBOS), in both phrasings, without a position and with each position. Images are
sampled exactly as training rollouts sample them (`marble.models.sampling.sample_latents` with the
config's sampling settings and the config's T5 `max_sequence_length`; the stock pipeline gives the same
latents, tests/test_models_sampling.py), then read by what the rewards score:
- colour: the palette colour with the largest `palette_match` (the colour reward's per-colour term);
- position: the side of POSITIONS on which `object_centroid` lies furthest (the position reward's term).
Chance is 1/8 for colour and 1/4 for position.

    marble conditioning --config tiny [--adapter DIR] [--json]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from marble.config import MarbleConfig
from marble.data.tiny_world import (
    HELD_OUT_COMBOS,
    PALETTE,
    POSITIONS,
    color_grammar,
    named_colors,
    named_position,
)
from marble.rewards.offline import POSITION_AXES, object_centroid, palette_match


@dataclass(frozen=True)
class ConditioningAccuracy:
    """Accuracies on held-out prompts (fractions in [0, 1]) and what they were measured on."""

    color: float  # nearest palette colour == the named colour, over all held-out prompts
    position: float  # furthest side == the named position, over the held-out prompts naming one
    color_chance: float
    position_chance: float
    images: int  # images scored for colour
    positional_images: int  # images scored for position
    per_color: dict[str, float]  # colour accuracy by named colour
    per_position: dict[str, float]  # position accuracy by named position


def held_out_prompts() -> list[str]:
    """The colour prompts of HELD_OUT_COMBOS: both phrasings, no position and each position."""
    return color_grammar(list(HELD_OUT_COMBOS))


@torch.no_grad()
def sample_images(pipe, cfg: MarbleConfig, prompts: list[str], seed: int) -> torch.Tensor:
    """Images `[N, 3, H, W]` in [0, 1] for `prompts` as training rollouts make them: CFG-free Euler at
    `cfg.sampling` (steps, shift, resolution, batch size), T5 padded to `cfg.model.max_sequence_length`,
    image i's noise from its own generator seeded (seed, i)."""
    from marble.models.sampling import decode_latents, sample_latents
    from marble.models.text import encode_prompts

    s = cfg.sampling
    side = s.resolution // int(pipe.vae_scale_factor)
    shape = (int(pipe.transformer.config.in_channels), side, side)
    out = []
    for start in range(0, len(prompts), s.batch_size):
        chunk = prompts[start : start + s.batch_size]
        emb = encode_prompts(pipe, chunk, cfg.model.max_sequence_length)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(chunk))]
        z = sample_latents(
            pipe.transformer, emb, num_steps=s.num_steps, shift=s.shift,
            latent_shape=shape, generator=gens,
        )  # fmt: skip
        out.append(decode_latents(pipe.vae, z).float().cpu())
    return torch.cat(out)


def score_conditioning(images: torch.Tensor, prompts: list[str]) -> ConditioningAccuracy:
    """Colour and position accuracy of `images` `[N, 3, H, W]` against their colour `prompts`."""
    colors = torch.tensor([list(PALETTE).index(named_colors(p)[0]) for p in prompts])  # [N]
    color_ok = palette_match(images).argmax(dim=1) == colors  # [N]
    pos_idx = [i for i, p in enumerate(prompts) if named_position(p)]
    named = torch.tensor([POSITIONS.index(named_position(prompts[i])) for i in pos_idx], dtype=torch.long)
    side = (object_centroid(images[pos_idx]) @ POSITION_AXES.T).argmax(dim=1)  # [M]
    pos_ok = side == named
    per_color = {c: _mean(color_ok[colors == k]) for k, c in enumerate(PALETTE)}
    per_position = {p: _mean(pos_ok[named == k]) for k, p in enumerate(POSITIONS)}
    return ConditioningAccuracy(
        color=_mean(color_ok), position=_mean(pos_ok), color_chance=1 / len(PALETTE),
        position_chance=1 / len(POSITIONS), images=len(prompts), positional_images=len(pos_idx),
        per_color=per_color, per_position=per_position,
    )  # fmt: skip


def _mean(ok: torch.Tensor) -> float:
    return float(ok.float().mean()) if ok.numel() else float("nan")


def conditioning_accuracy(
    pipe, cfg: MarbleConfig, *, images_per_prompt: int = 2, seed: int = 0
) -> ConditioningAccuracy:
    """Colour and position accuracy of `pipe` (base model, or with an adapter loaded) on the held-out
    colour x shape prompts, `images_per_prompt` seeds each, sampled as training rollouts sample."""
    prompts = [p for p in held_out_prompts() for _ in range(images_per_prompt)]
    return score_conditioning(sample_images(pipe, cfg, prompts, seed), prompts)


@torch.no_grad()
def vae_round_trip_accuracy(vae, resolution: int, seed: int = 0) -> ConditioningAccuracy:
    """The ceiling of `conditioning_accuracy` that the VAE sets: the renderer's own images of the
    held-out prompts, encoded (posterior mean) and decoded, read as sampled images are read. A model
    cannot show a colour its VAE does not decode to. Encoded as pretraining encodes (scaled as the
    pipeline scales), decoded as sampled latents are."""
    from marble.models.sampling import decode_latents
    from marble.models.tiny_pretrain import encode_dataset
    from marble.models.tiny_render import render_batch

    prompts = held_out_prompts()
    images = render_batch(prompts, resolution, torch.Generator().manual_seed(seed))  # [N, 3, H, W]
    latents = encode_dataset(vae, images.to(vae.device, vae.dtype))  # [N, C, h, w]
    return score_conditioning(decode_latents(vae, latents).cpu(), prompts)


@dataclass(frozen=True)
class WorldConditioning:
    """A pipeline's sampled accuracy and the ceiling its VAE sets, measured with the same seed."""

    sampled: ConditioningAccuracy
    vae_round_trip: ConditioningAccuracy

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the sampled accuracy's fields, plus `vae_round_trip` with the ceiling's."""
        return {**asdict(self.sampled), "vae_round_trip": asdict(self.vae_round_trip)}


def world_conditioning(
    pipe, cfg: MarbleConfig, *, images_per_prompt: int = 2, seed: int = 0
) -> WorldConditioning:
    """`conditioning_accuracy` of `pipe` and `vae_round_trip_accuracy` of its VAE: what
    `marble conditioning` and the reward study report."""
    return WorldConditioning(
        sampled=conditioning_accuracy(pipe, cfg, images_per_prompt=images_per_prompt, seed=seed),
        vae_round_trip=vae_round_trip_accuracy(pipe.vae, cfg.sampling.resolution, seed=seed),
    )


def format_accuracy(acc: ConditioningAccuracy) -> str:
    """A few lines a person reads: both accuracies against chance, then per colour and per position."""
    lines = [
        f"colour   {acc.color:6.1%}  (chance {acc.color_chance:.1%}, {acc.images} images)",
        f"position {acc.position:6.1%}  (chance {acc.position_chance:.1%}, {acc.positional_images} images)",
        "per colour:   " + ", ".join(f"{c} {v:.0%}" for c, v in acc.per_color.items()),
        "per position: " + ", ".join(f"{p} {v:.0%}" for p, v in acc.per_position.items()),
    ]
    return "\n".join(lines)
