"""OCR reward: the scoring rule on hand-written strings; TrOCR through the real loading code on a tiny model."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from _tiny_reward_models import save_tiny_trocr

from marble.config import OcrReward
from marble.errors import RewardError
from marble.rewards import build_reward
from marble.rewards.ocr import edit_distance, normalize_text, ocr_score, ocr_target


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("same", "same", 0), ("flaw", "lawn", 2)],
)
def test_edit_distance(a, b, d):
    assert edit_distance(a, b) == d == edit_distance(b, a)


def test_ocr_rule_hand_computed():
    assert normalize_text(" Hello  World\n") == "helloworld"
    assert ocr_score("HELLO world", "hello world") == 1.0  # case and spaces ignored
    assert ocr_score("helo", "hello") == pytest.approx(0.8)  # one deletion over 5 characters
    assert ocr_score("", "open") == 0.0
    assert ocr_score("a completely different and much longer text", "ab") == 0.0  # distance clipped at len
    assert ocr_score("sale!", "sale") == pytest.approx(0.75)
    assert math.isnan(ocr_score("anything", "  "))
    assert ocr_target('a sign that says "Open Late" and "no"') == "Open Late"  # the FIRST pair
    assert ocr_target("no quotes here") is None
    assert ocr_target('empty "" quotes') is None
    assert ocr_target('unclosed "quote') is None


class _FakeRecognizer:
    def __init__(self, texts):
        self.texts, self.calls = texts, []

    def __call__(self, images):
        self.calls.append(images.shape[0])
        return self.texts[: images.shape[0]]


def test_reward_scores_only_prompts_with_quotes():
    r = build_reward(OcrReward(name="ocr", model="unused"))
    fake = _FakeRecognizer(["Hello", "helo"])
    r.recognizer, r._ready = fake, True
    prompts = ['a sign that says "hello"', "a red circle", 'a poster with the word "hello"']
    out = r(torch.rand(3, 3, 8, 8), prompts, [{}] * 3).scores
    assert fake.calls == [2]  # the non-applicable image never reaches the recogniser
    assert out[0].item() == 1.0 and math.isnan(out[1].item()) and out[2].item() == pytest.approx(0.8)


def test_trocr_backend_loads_tiny_model_through_real_path(tmp_path):
    model_dir = save_tiny_trocr(tmp_path / "trocr")
    r = build_reward(OcrReward(name="ocr", model=str(model_dir), batch_size=2))
    r.setup("cpu")
    r.recognizer.max_new_tokens = 6  # keep the test fast; real runs use 32
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    images[1] = 0.0
    texts = r.recognizer(images)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert texts[1] != texts[0]  # the random decoder still depends on the image
    prompts = ['"open"', '"zero"', 'a sign that says "exit"']
    scores = r(images, prompts, [{}] * 3).scores
    expected = [ocr_score(t, ocr_target(p)) for t, p in zip(texts, prompts, strict=True)]
    assert scores.tolist() == pytest.approx(expected)
    assert ((scores >= 0) & (scores <= 1)).all()


@pytest.mark.skipif(importlib.util.find_spec("paddleocr") is not None, reason="paddleocr installed")
def test_missing_paddle_backend_is_a_clear_error():
    with pytest.raises(RewardError, match="paddleocr paddlepaddle"):
        build_reward(OcrReward(name="ocr", backend="paddle")).setup("cpu")


@pytest.mark.skipif(importlib.util.find_spec("easyocr") is not None, reason="easyocr installed")
def test_missing_easyocr_backend_names_the_extra():
    with pytest.raises(RewardError, match=r"marble\[ocr\]"):
        build_reward(OcrReward(name="ocr", backend="easyocr")).setup("cpu")
