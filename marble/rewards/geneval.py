"""GenEval (Ghosh et al. 2023) on a transformers open-vocabulary detector (OWLv2), no mmcv.

Metadata per prompt (GenEval's `evaluation_metadata.jsonl`):
`{"tag": "counting", "include": [{"class": "dog", "count": 2, "color": "red", "position": ["left of", 0]}],
  "exclude": [{"class": "dog", "count": 3}]}`. Prompts without `include` metadata get NaN.

The rules follow GenEval's `evaluate_images.py` (written from its description, not copied):
- detections above 0.3 confidence (0.9 for the `counting` tag), best first, at most 16 per class;
- an `include` requirement needs `count` objects of its class; `color`: CLIP zero-shot over GenEval's ten
  colours on each box crop, at least `count` crops of the colour; `position` ["left of", j]: every found
  object must stand in that relation to every object matched by include group j (boxes' centre offset,
  shrunk by 0.1 x the summed box sizes, normalised; a component beyond 0.5 names the relation);
- an `exclude` requirement fails when `count` or more objects of its class are found.
Evaluation = GenEval's binary "all requirements hold" (`extras["binary"]`). Training score = partial
credit [ours; the binary score is too sparse for RL]: the mean over requirements of
count min(found, n)/n, colour min(matches, n)/n, position fraction of satisfied objects, exclude 0/1.

OWLv2 predicts one box per image patch, so duplicates of one object are suppressed with class-wise NMS at
IoU 0.5 [ours]; GenEval's Mask2Former needs none (its NMS threshold is 1.0, i.e. off).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from marble.hub import Artifact, Hub
from marble.images import to_pil
from marble.rewards.base import BaseReward, RewardOutput
from marble.rewards.clip import clip_text_embeds

log = logging.getLogger(__name__)

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
"""GenEval's colour vocabulary."""
COLOR_TEMPLATES = (
    "a photo of a {color} {cls}",
    "a photo of a {color}-colored {cls}",
    "a photo of a {color} object",
)
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
NMS_IOU = 0.5


@dataclass(frozen=True)
class Detection:
    """One detected object: class name, confidence, box (x0, y0, x1, y1) in pixels."""

    cls: str
    score: float
    box: tuple[float, float, float, float]


# ------------------------------------------------------------------------------------ pure rules
def box_iou(a: tuple, b: tuple) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def select_objects(
    detections: list[Detection], threshold: float, nms_iou: float = NMS_IOU, max_objects: int = MAX_OBJECTS
) -> dict[str, list[Detection]]:
    """Per class: confidence > threshold, best first, greedy NMS, at most `max_objects`."""
    out: dict[str, list[Detection]] = {}
    for cls in dict.fromkeys(d.cls for d in detections):
        ranked = sorted(
            (d for d in detections if d.cls == cls and d.score > threshold), key=lambda d: -d.score
        )
        kept: list[Detection] = []
        for d in ranked[:max_objects]:
            if nms_iou >= 1.0 or all(box_iou(d.box, k.box) < nms_iou for k in kept):
                kept.append(d)
        if kept:
            out[cls] = kept
    return out


def relative_position(a: Detection, b: Detection, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of A with respect to B: subset of {"left of", "right of", "above", "below"} (GenEval)."""
    ca = ((a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2)
    cb = ((b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2)
    size = (a.box[2] - a.box[0] + b.box[2] - b.box[0], a.box[3] - a.box[1] + b.box[3] - b.box[1])
    offset = (ca[0] - cb[0], ca[1] - cb[1])
    revised = [math.copysign(max(abs(o) - threshold * s, 0.0), o) for o, s in zip(offset, size, strict=True)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:  # image y grows downwards
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def evaluate_geneval(
    objects: dict[str, list[Detection]],
    metadata: dict,
    colors_of: Callable[[str, list[Detection]], list[str]],
) -> tuple[bool, float]:
    """GenEval's verdict and our partial credit for one image; see the module docstring.

    objects: selected detections per class; colors_of(cls, detections) -> predicted colour per detection.
    """
    correct = True
    credits: list[float] = []
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, n = req["class"], int(req.get("count", 1))
        found = objects.get(cls, [])[:n]
        matched = len(found) >= n
        credits.append(min(len(found), n) / n)
        if "color" in req:
            colors = colors_of(cls, found) if found else []
            credits.append(min(colors.count(req["color"]), n) / n)
            if matched and colors.count(req["color"]) < n:
                matched = False
        if "position" in req:
            relation, target = req["position"]
            anchors = groups[target] if target < len(groups) else None
            ok = [all(relation in relative_position(o, t) for t in anchors) for o in found] if anchors else []
            credits.append(sum(ok) / n)
            if matched and (not anchors or not all(ok)):
                matched = False
        correct = correct and matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        absent = len(objects.get(req["class"], [])) < int(req.get("count", 1))
        credits.append(float(absent))
        correct = correct and absent
    return correct, (sum(credits) / len(credits) if credits else 1.0)


def geneval_classes(metadata: dict) -> list[str]:
    """Classes the detector must look for (include and exclude), in first-mention order."""
    return list(dict.fromkeys(r["class"] for key in ("include", "exclude") for r in metadata.get(key, [])))


# ------------------------------------------------------------------------------------ the reward
class GenEvalScorer(BaseReward):
    """GenEval on OWLv2 + CLIP colour; applies only to prompts with GenEval `include` metadata.

    scores = partial credit in [0, 1] (training); extras["binary"] = GenEval accuracy (evaluation).
    """

    requires_weights = True
    score_range = (0.0, 1.0)
    eval_extra = "binary"  # GenEval reports accuracy [MARBLE §7: "GenEval reported as binary accuracy"]

    @classmethod
    def artifacts(cls, spec) -> list[Artifact]:
        return [Artifact(spec.model, spec.revision), Artifact(spec.clip_model, spec.clip_revision)]

    def _load(self, hub: Hub) -> None:
        from transformers import AutoProcessor, CLIPModel, Owlv2ForObjectDetection

        s = self.spec
        self.det_processor = hub.from_pretrained(
            AutoProcessor, s.model, s.revision, "GenEval detector processor"
        )
        det = hub.from_pretrained(Owlv2ForObjectDetection, s.model, s.revision, "GenEval detector")
        self.detector = det.eval().requires_grad_(False).to(self.device)
        self.clip_processor = hub.from_pretrained(
            AutoProcessor, s.clip_model, s.clip_revision, "GenEval CLIP"
        )
        clip = hub.from_pretrained(CLIPModel, s.clip_model, s.clip_revision, "GenEval CLIP")
        self.clip = clip.eval().requires_grad_(False).to(self.device)
        self._color_text: dict[str, Tensor] = {}

    @torch.no_grad()
    def detect(self, image: Tensor, classes: list[str]) -> list[Detection]:
        """All OWLv2 boxes of one image `[3, H, W]` with their best class among `classes` (no threshold)."""
        queries = [f"a photo of a {c}" for c in classes]
        inputs = self.det_processor(text=[queries], images=to_pil(image[None]), return_tensors="pt").to(
            self.device
        )
        out = self.detector(**inputs)
        best = out.logits[0].max(dim=-1)  # over queries: [P]
        scores = torch.sigmoid(best.values).cpu()  # [P]
        # OWLv2 boxes are (cx, cy, w, h) relative to the image padded to a square of side max(H, W)
        side = float(max(image.shape[-2:]))
        cx, cy, w, h = (out.pred_boxes[0].cpu().double() * side).unbind(-1)  # [P] each
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)  # [P, 4]
        return [
            Detection(classes[int(k)], float(s), tuple(float(v) for v in b))
            for k, s, b in zip(best.indices.cpu(), scores, boxes, strict=True)
        ]

    def _color_classifier(self, cls: str) -> Tensor:
        """Zero-shot colour weights `[10, E]`: mean of the normalised template embeddings, renormalised."""
        if cls not in self._color_text:
            texts = [t.format(color=c, cls=cls) for c in COLORS for t in COLOR_TEMPLATES]
            emb = clip_text_embeds(self.clip, self.clip_processor.tokenizer, texts, self.device)  # [10 T, E]
            emb = emb.view(len(COLORS), len(COLOR_TEMPLATES), -1).mean(dim=1)  # [10, E]
            self._color_text[cls] = emb / emb.norm(dim=-1, keepdim=True)
        return self._color_text[cls]

    def _colors(self, image: Tensor, cls: str, found: list[Detection]) -> list[str]:
        from marble.rewards.clip import clip_image_embeds

        h, w = image.shape[-2:]
        crops = []
        for d in found:
            x0, y0 = max(0, int(d.box[0])), max(0, int(d.box[1]))
            x1, y1 = min(w, max(x0 + 1, math.ceil(d.box[2]))), min(h, max(y0 + 1, math.ceil(d.box[3])))
            crops.append(image[:, y0:y1, x0:x1])
        emb = torch.cat(
            [clip_image_embeds(self.clip, self.clip_processor, c[None], self.device) for c in crops]
        )
        logits = emb @ self._color_classifier(cls).T  # [n, 10]
        return [COLORS[i] for i in logits.argmax(dim=-1).tolist()]

    def _score(self, images: Tensor, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        partial, binary = [], []
        for image, meta in zip(images, metadata, strict=True):
            threshold = (
                self.spec.count_threshold if meta.get("tag") == "counting" else self.spec.detection_threshold
            )
            objects = select_objects(self.detect(image, geneval_classes(meta)), threshold)
            ok, credit = evaluate_geneval(
                objects, meta, lambda cls, found, im=image: self._colors(im, cls, found)
            )
            partial.append(credit)
            binary.append(float(ok))
        return RewardOutput(
            scores=torch.tensor(partial, dtype=torch.float64),
            extras={"binary": torch.tensor(binary, dtype=torch.float64)},
        )
