"""LoRA adapters on the SD3 transformer (peft): a trainable "default", a frozen "old", export for diffusers.

- "default": the policy being trained.
- "old": the sampling policy of DiffusionNFT, a slow EMA of "default" (docs/algorithm.md §5).
- the reference: the base model, `with model.disable_adapter():`.
Export follows the traps in docs/library-notes.md (peft): the state dict is taken in the BASE model's naming and
saved with `save_lora_weights` together with the adapter metadata, or stock diffusers either loads
nothing or silently loses the lora_alpha scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import Tensor, nn

from marble.config import LoraConfig
from marble.io import staged_dir

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
_PEFT_PREFIX = "base_model.model."


def peft_config(lora_cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=lora_cfg.rank,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        init_lora_weights="gaussian" if lora_cfg.init == "gaussian" else True,
        target_modules=list(lora_cfg.target_modules),
    )


def add_lora_adapters(transformer, lora_cfg: LoraConfig) -> PeftModel:
    """Wrap `transformer` with a trainable "default" adapter and a frozen "old" copy of it."""
    transformer.requires_grad_(False)
    cfg = peft_config(lora_cfg)
    model = get_peft_model(transformer, cfg, adapter_name="default")
    model.add_adapter("old", cfg)
    copy_adapter(model, "default", "old")
    model.set_adapter("default")
    for name, p in model.named_parameters():
        p.requires_grad_(".default." in name and "lora_" in name)
    return model


class AdapterSwitch:
    """Which adapter the model's forward uses, switched on its LoRA layers directly.

    peft's model-level switches walk the whole module tree on every call (`PeftModel.set_adapter`
    twice over; `disable_adapter` also builds `get_model_status()`): on the tiny model's 294 modules
    2.5-4.5 ms and 5-8 ms per call against 1.0-1.4 ms for this class (measured on the 2-core
    development machine; a training step switches on every micro-step), and proportional to the
    number of modules. The
    layers' own peft methods do the same work per layer (`BaseTunerLayer.set_adapter`, which sets the
    active adapter trainable and freezes the others, and `enable_adapters`); this class finds the layers
    once. It refuses models with peft's auxiliary wrappers (`modules_to_save`), which only the
    model-level call switches, and merged layers, which the model-level call would unmerge first.
    """

    def __init__(self, model: nn.Module, default: str = "default") -> None:
        aux = [n for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
        if aux:
            raise ValueError(
                f"AdapterSwitch: the model has {len(aux)} peft auxiliary wrappers (modules_to_save, e.g. "
                f"{aux[:2]}); switch adapters with the model's own set_adapter"
            )
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        if not self.layers:
            raise ValueError("AdapterSwitch: the model has no peft adapter layers")
        merged = sum(bool(m.merged) for m in self.layers)
        if merged:
            raise ValueError(f"AdapterSwitch: {merged} adapter layers are merged into their base weights")
        self.default = default

    @contextmanager
    def active(self, name: str) -> Iterator[None]:
        """Adapter `name` active for the block (trainable as peft sets it), the default one after."""
        for layer in self.layers:
            layer.set_adapter(name)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.set_adapter(self.default)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """No adapter for the block: the base model (the KL reference)."""
        for layer in self.layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.enable_adapters(True)


def adapter_state_dict(model: PeftModel, name: str) -> dict[str, Tensor]:
    """The adapter's LoRA tensors (detached clones), keyed without the adapter name."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


@torch.no_grad()
def load_adapter_state_dict(model: PeftModel, name: str, state: dict[str, Tensor]) -> None:
    """Copy `state` (as returned by `adapter_state_dict`) into adapter `name`, exactly."""
    expected = set(get_peft_model_state_dict(model, adapter_name=name))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ValueError(f"adapter {name!r}: state keys differ (missing {missing}, unexpected {extra})")
    result = set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"adapter {name!r}: keys not loaded: {unexpected[:3]}")


def copy_adapter(model: PeftModel, src: str = "default", dst: str = "old") -> None:
    load_adapter_state_dict(model, dst, adapter_state_dict(model, src))


def _lora_pairs(model: PeftModel, a: str, b: str) -> list[tuple[Tensor, Tensor]]:
    params = dict(model.named_parameters())
    pairs = []
    for name, p in params.items():
        if f".{a}." in name and "lora_" in name:
            pairs.append((p, params[name.replace(f".{a}.", f".{b}.")]))
    if not pairs:
        raise ValueError(f"no LoRA parameters of adapter {a!r}")
    return pairs


@torch.no_grad()
def blend_old_adapter(model: PeftModel, eta: float) -> None:
    """θ_old ← η θ_old + (1 − η) θ  (DiffusionNFT's old-policy update, docs/algorithm.md §5)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta={eta} must lie in [0, 1]")
    for old, new in _lora_pairs(model, "old", "default"):
        old.mul_(eta).add_(new.to(old.dtype), alpha=1.0 - eta)


def _diffusers_layers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """PeftModel keys -> the base model's module naming that `save_lora_weights` expects."""
    return {k.removeprefix(_PEFT_PREFIX): v.detach().to("cpu").contiguous() for k, v in state.items()}


def export_adapter(
    model: PeftModel,
    out_dir: str | Path,
    adapter_name: str = "default",
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write `out_dir/pytorch_lora_weights.safetensors` that stock `pipe.load_lora_weights(out_dir)` loads.

    `state_dict` (e.g. EMA weights, in `adapter_state_dict` naming) overrides the adapter's live weights.
    Written to a temporary directory first and renamed, so a reader never sees half an adapter.
    """
    from diffusers import StableDiffusion3Pipeline

    out_dir = Path(out_dir)
    state = state_dict if state_dict is not None else adapter_state_dict(model, adapter_name)
    metadata = model.peft_config[adapter_name].to_dict()
    metadata["target_modules"] = sorted(metadata.get("target_modules") or [])
    with staged_dir(out_dir) as tmp:
        StableDiffusion3Pipeline.save_lora_weights(
            save_directory=str(tmp),
            transformer_lora_layers=_diffusers_layers(state),
            transformer_lora_adapter_metadata=metadata,
            safe_serialization=True,
        )
    return out_dir


def load_adapter_into_pipeline(pipe, adapter_dir: str | Path, adapter_name: str = "marble") -> None:
    """Stock diffusers loading (`pipe.load_lora_weights`), refusing a load that attached nothing."""
    from marble.errors import MarbleError

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_FILE).is_file():
        raise MarbleError(f"{adapter_dir / ADAPTER_FILE}: adapter file not found")
    pipe.load_lora_weights(str(adapter_dir), adapter_name=adapter_name)
    attached = any(adapter_name in getattr(m, "lora_A", {}) for m in pipe.transformer.modules())
    if not attached:
        raise MarbleError(
            f"{adapter_dir}: load_lora_weights attached no LoRA layer (keys not in diffusers format?)"
        )
