"""Load an SD3 pipeline from a hub id, a local directory, a verified cache, or the tiny world.

The tiny world is not special-cased past `resolve_pretrained`: it is built once into a directory and
then loaded by exactly the code that loads stabilityai/stable-diffusion-3.5-medium.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from marble.config import ModelConfig
from marble.errors import MarbleError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_pretrained(model_cfg: ModelConfig, cache_dir: Path | None = None) -> tuple[str, dict]:
    """`(path_or_hub_id, from_pretrained kwargs)` for the base model."""
    if model_cfg.is_tiny:
        from marble.models.tiny import ensure_tiny_model

        return str(ensure_tiny_model(model_cfg)), {}
    local = Path(model_cfg.pretrained).expanduser()
    if local.is_dir():
        return str(local), {}
    if cache_dir is not None:
        from marble.rewards.hub import resolve_model

        return resolve_model(model_cfg.pretrained, model_cfg.revision, cache_dir)
    if model_cfg.pretrained.startswith((".", "/", "~")):
        raise MarbleError(f"model.pretrained={model_cfg.pretrained!r}: local directory does not exist")
    kwargs: dict = {"revision": model_cfg.revision} if model_cfg.revision else {}
    if model_cfg.offline or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        kwargs["local_files_only"] = True  # never hang on network time-outs when offline was asked for
    return model_cfg.pretrained, kwargs


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
    cache_dir: Path | None = None,
):
    """A frozen `StableDiffusion3Pipeline` on `device` (dtype from the config unless given)."""
    from diffusers import StableDiffusion3Pipeline

    if model_cfg.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    source, kwargs = resolve_pretrained(model_cfg, cache_dir)
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
