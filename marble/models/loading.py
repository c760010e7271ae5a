"""Load an SD3 pipeline from a hub id, a local directory, a verified cache (all through `marble.hub`),
or the tiny world.

The tiny world is not special-cased past `resolve_pretrained`: it is built once into a directory and
then loaded by exactly the code that loads stabilityai/stable-diffusion-3.5-medium.
"""

from __future__ import annotations

import logging

import torch

from marble.config import ModelConfig
from marble.errors import HubError, MarbleError
from marble.hub import Artifact, Hub

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PIPELINE_PATTERNS = ("model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model")
"""A diffusers pipeline repo without its root-level single-file checkpoints."""


def base_model_artifacts(model_cfg: ModelConfig) -> list[Artifact]:
    """The repo the base model loads from (none for the tiny world, which is built locally)."""
    return (
        [] if model_cfg.is_tiny else [Artifact(model_cfg.pretrained, model_cfg.revision, PIPELINE_PATTERNS)]
    )


def resolve_pretrained(model_cfg: ModelConfig, hub: Hub | None = None) -> tuple[str, dict]:
    """`(path_or_hub_id, from_pretrained kwargs)` for the base model (through `hub`, see `marble.hub`)."""
    if model_cfg.is_tiny:
        from marble.models.tiny import ensure_tiny_model

        return str(ensure_tiny_model(model_cfg)), {}
    hub = hub or Hub.create(offline=model_cfg.offline)
    try:
        return hub.locate(model_cfg.pretrained, model_cfg.revision)
    except HubError as exc:
        raise HubError(f"model.pretrained={model_cfg.pretrained!r}: {exc}") from exc


def _dtype_keyword() -> str:
    """`dtype` where diffusers has renamed it (the old `torch_dtype` then warns on every load); older
    releases within our `diffusers>=0.35` range know only `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def load_pipeline(
    model_cfg: ModelConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    hub: Hub | None = None,
):
    """A frozen `StableDiffusion3Pipeline` on `device` (dtype from the config unless given), its weights
    located through `hub` (default: local directory or hub id, offline as `model.offline` says)."""
    from diffusers import StableDiffusion3Pipeline

    source, kwargs = resolve_pretrained(model_cfg, hub)
    dtype = dtype or _DTYPES[model_cfg.dtype]
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(source, **{_dtype_keyword(): dtype}, **kwargs)
    except (OSError, ValueError) as exc:
        raise MarbleError(
            f"model.pretrained={model_cfg.pretrained!r}: cannot load an SD3 pipeline from {source!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    pipe.to(device)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
