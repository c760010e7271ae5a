"""HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences.

Loading, as in the HPSv2 package's scorer but without its unsafe parts: build the open_clip architecture
with NO pretrained weights (the HPS state dict replaces them all), then load `HPS_v2.1_compressed.pt` from
`xswu/HPSv2` with `torch.load(weights_only=True)` (or a `.safetensors` conversion); a plain pickle load is
never done. The checkpoint is either `{"state_dict": {...}}` or the state dict itself.

Preprocessing = open_clip's validation transform, written without torchvision: uint8 RGB, resize the
shortest side to 224 (PIL bicubic), centre crop 224, scale to [0, 1], normalise with the model's
mean/std (OpenAI CLIP's by default). Score = cos(image, text) of the normalised features (the diagonal of
`image_features @ text_features.T` in HPSv2), ~0.2-0.35 for SD3.5 Medium.

open_clip is an optional extra (`pip install 'marble[hps]'`); it pulls torchvision, which must match your
torch build.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from marble.errors import RewardError
from marble.hub import Artifact, Hub, load_state_dict_file
from marble.images import to_uint8_hwc
from marble.rewards.base import BaseReward

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def import_open_clip():
    try:
        import open_clip
    except ImportError as exc:
        raise RewardError(
            f"the hpsv21 reward needs open_clip: pip install 'marble[hps]' (import failed: {exc})"
        ) from exc
    return open_clip


def clip_preprocess(images: Tensor, size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> Tensor:
    """open_clip's validation transform without torchvision: `[N, 3, H, W]` [0, 1] -> `[N, 3, size, size]`."""
    out = []
    for arr in to_uint8_hwc(images):
        img = Image.fromarray(arr, mode="RGB")
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)  # [N, 3, size, size]
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def unwrap_state_dict(state: dict) -> dict:
    """HPS checkpoints store `{"state_dict": ...}`; DDP-saved ones prefix keys with `module.`."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


class HPSv21Scorer(BaseReward):
    """HPSv2.1 preference score; applies to every prompt; cosine, so within [-1, 1]."""

    requires_weights = True
    score_range = (-1.0, 1.0)

    @classmethod
    def artifacts(cls, spec) -> list[Artifact]:
        return [Artifact(spec.model, spec.revision, (spec.checkpoint_file,))]

    def _load(self, hub: Hub) -> None:
        open_clip = import_open_clip()
        s = self.spec
        model = open_clip.create_model(s.architecture, pretrained=None, device="cpu")
        path = hub.file(s.model, s.checkpoint_file, s.revision)
        state = unwrap_state_dict(load_state_dict_file(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RewardError(
                f"{path}: does not fit open_clip {s.architecture!r} (missing {sorted(missing)[:3]}..., "
                f"unexpected {sorted(unexpected)[:3]}...)"
            )
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = open_clip.get_tokenizer(s.architecture)
        visual = getattr(self.model, "visual", None)
        size = getattr(visual, "image_size", 224)
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.mean = tuple(getattr(visual, "image_mean", None) or OPENAI_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or OPENAI_STD)
        log.info(
            "loaded HPSv2.1 from %s (open_clip %s)",
            path,
            getattr(sys.modules["open_clip"], "__version__", "?"),
        )

    @torch.no_grad()
    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        pixels = clip_preprocess(images, self.image_size, self.mean, self.std).to(self.device)
        img = self.model.encode_image(pixels).float()  # [n, E]
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()  # [n, E]
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(dim=-1).double().cpu()  # [n]
