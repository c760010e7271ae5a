"""OCR reward: does the image show the text the prompt quotes?

Rule (flow_grpo's OCR reward, used by DiffusionNFT and MARBLE): the target is the text between the first
pair of double quotes, NaN when there is none; recognised and target text are lowercased with all spaces
removed; score = 1 - min(edit distance, len(target)) / len(target), in [0, 1].

Recognizers (`spec.backend`):
- `trocr` (default; plain transformers, no mmcv/Paddle): `VisionEncoderDecoderModel` + its processor,
  greedy decoding of the whole image as one text line. TrOCR is a line recogniser with no detector, so
  it reads best when the text dominates the image (the case for OCR prompts); it is not PaddleOCR, which
  the paper used, so absolute scores differ from the paper's table.
- `easyocr` (extra `ocr`): detector + recogniser; all detected strings joined with spaces.
- `paddle` (install `paddleocr` and `paddlepaddle` yourself): PaddleOCR as in flow_grpo.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import Tensor

from marble.data.tiny_world import quoted_text
from marble.errors import RewardError
from marble.hub import Artifact, Hub
from marble.images import to_pil, to_uint8_hwc
from marble.rewards.base import BaseReward

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ scoring rule
def ocr_target(prompt: str) -> str | None:
    """Text between the first pair of double quotes (non-empty after normalisation), else None."""
    text = quoted_text(prompt)
    return text if text is not None and normalize_text(text) else None


def normalize_text(text: str) -> str:
    """Lowercase and drop every whitespace character ("Hello World" -> "helloworld")."""
    return "".join(text.lower().split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit insert/delete/substitute), O(len(a) len(b)) dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(recognized: str, target: str) -> float:
    """1 - min(d, len)/len on normalised strings; NaN for an empty target."""
    t, r = normalize_text(target), normalize_text(recognized)
    if not t:
        return math.nan
    return 1.0 - min(edit_distance(r, t), len(t)) / len(t)


# ------------------------------------------------------------------------------------- recognizers
class TrOcrRecognizer:
    """transformers TrOCR (`microsoft/trocr-base-printed` by default), greedy decoding."""

    def __init__(self, model: str, revision: str | None, hub: Hub, device, max_new_tokens=32):
        from transformers import AutoProcessor, VisionEncoderDecoderModel

        self.processor = hub.from_pretrained(AutoProcessor, model, revision, "OCR processor")
        net = hub.from_pretrained(VisionEncoderDecoderModel, model, revision, "OCR model")
        self.model = net.eval().requires_grad_(False).to(device)
        self.device = device
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def __call__(self, images: Tensor) -> list[str]:
        pixels = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"].to(self.device)
        ids = self.model.generate(pixels, max_new_tokens=self.max_new_tokens, num_beams=1, do_sample=False)
        return self.processor.tokenizer.batch_decode(ids, skip_special_tokens=True)


class EasyOcrRecognizer:
    """easyocr (`pip install marble[ocr]`); its own weights, downloaded by easyocr into its model dir."""

    def __init__(self, device, model_dir: Path | None = None):
        try:
            import easyocr
        except ImportError as exc:
            raise RewardError("OCR backend 'easyocr' needs the extra: pip install 'marble[ocr]'") from exc
        kwargs = {"model_storage_directory": str(model_dir)} if model_dir else {}
        self.reader = easyocr.Reader(["en"], gpu=str(device).startswith("cuda"), **kwargs)

    def __call__(self, images: Tensor) -> list[str]:
        return [" ".join(self.reader.readtext(arr, detail=0)) for arr in to_uint8_hwc(images)]


class PaddleOcrRecognizer:
    """PaddleOCR, the paper's recogniser (optional; needs `paddleocr` and `paddlepaddle`)."""

    def __init__(self, device):
        try:
            from paddleocr import PaddleOCR
        except ImportError as exc:
            raise RewardError(
                "OCR backend 'paddle' needs PaddleOCR: pip install paddleocr paddlepaddle "
                "(or use backend: trocr, which needs only transformers)"
            ) from exc
        self.ocr = PaddleOCR(use_angle_cls=False, lang="en")

    def __call__(self, images: Tensor) -> list[str]:
        texts = []
        for arr in to_uint8_hwc(images):
            result = self.ocr.ocr(arr, cls=False)
            lines = [line[1][0] for page in (result or []) for line in (page or [])]
            texts.append(" ".join(lines))
        return texts


class OcrScorer(BaseReward):
    """The OCR reward; applies only to prompts with quoted text (NaN elsewhere). Range [0, 1]."""

    requires_weights = True
    score_range = (0.0, 1.0)

    @classmethod
    def artifacts(cls, spec) -> list[Artifact]:
        # easyocr and PaddleOCR fetch their own weights into their own directories
        return [Artifact(spec.model, spec.revision)] if spec.backend == "trocr" else []

    def _load(self, hub: Hub) -> None:
        s = self.spec
        if s.backend == "trocr":
            self.recognizer = TrOcrRecognizer(s.model, s.revision, hub, self.device)
        elif s.backend == "easyocr":
            self.recognizer = EasyOcrRecognizer(self.device)
        else:
            self.recognizer = PaddleOcrRecognizer(self.device)

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> Tensor:
        texts = self.recognizer(images)
        return torch.tensor(
            [ocr_score(t, ocr_target(p) or "") for t, p in zip(texts, prompts, strict=True)],
            dtype=torch.float64,
        )
