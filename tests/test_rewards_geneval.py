"""GenEval rules on hand-written detection lists; OWLv2 + CLIP through the real loading code (tiny models)."""

from __future__ import annotations

import math

import pytest
import torch
from _tiny_reward_models import save_tiny_clip, save_tiny_owlv2

from marble.config import GenEvalReward
from marble.rewards import build_reward
from marble.rewards.geneval import (
    COLORS,
    Detection,
    evaluate_geneval,
    geneval_classes,
    relative_position,
    select_objects,
)


def det(cls, score, x0, y0, x1, y1):
    return Detection(cls, score, (x0, y0, x1, y1))


def no_colors(cls, found):
    raise AssertionError("colour must not be asked for")


def test_select_objects_threshold_order_nms_and_cap():
    dets = [
        det("dog", 0.5, 0, 0, 10, 10),
        det("dog", 0.95, 1, 1, 11, 11),  # overlaps the first (IoU 0.68): duplicate of the same dog
        det("dog", 0.92, 50, 50, 60, 60),
        det("cat", 0.2, 0, 0, 5, 5),  # below 0.3
    ]
    sel = select_objects(dets, threshold=0.3)
    assert [d.score for d in sel["dog"]] == [0.95, 0.92] and "cat" not in sel
    assert [d.score for d in select_objects(dets, threshold=0.9)["dog"]] == [0.95, 0.92]  # counting threshold
    assert len(select_objects(dets, threshold=0.3, nms_iou=1.0)["dog"]) == 3  # GenEval's NMS is off
    many = [det("cup", 0.9, 20 * i, 0, 20 * i + 10, 10) for i in range(20)]
    assert len(select_objects(many, threshold=0.3)["cup"]) == 16


def test_relative_position_hand_computed():
    left = det("a", 1, 0, 40, 20, 60)  # centre (10, 50)
    right = det("b", 1, 80, 40, 100, 60)  # centre (90, 50)
    assert relative_position(left, right) == {"left of"}
    assert relative_position(right, left) == {"right of"}
    top = det("c", 1, 40, 0, 60, 20)  # centre (50, 10); y grows downwards
    bottom = det("d", 1, 40, 80, 60, 100)
    assert relative_position(top, bottom) == {"above"} and relative_position(bottom, top) == {"below"}
    # diagonal: offset (80, 80), each shrunk by 0.1*(20+20) = 4 -> (76, 76)/|(80, 80)| = 0.67 > 0.5 both ways
    assert relative_position(det("e", 1, 0, 0, 20, 20), det("f", 1, 80, 80, 100, 100)) == {"left of", "above"}
    # nearly overlapping boxes: the shrunk offset vanishes -> no relation
    assert relative_position(det("g", 1, 0, 0, 100, 100), det("h", 1, 2, 0, 102, 100)) == set()


def test_counting_rule_and_partial_credit():
    meta = {
        "tag": "counting",
        "include": [{"class": "dog", "count": 3}],
        "exclude": [{"class": "dog", "count": 4}],
    }
    two = {"dog": [det("dog", 0.95, 0, 0, 1, 1), det("dog", 0.95, 5, 5, 6, 6)]}
    ok, credit = evaluate_geneval(two, meta, no_colors)
    assert not ok and credit == pytest.approx((2 / 3 + 1.0) / 2)  # count 2/3, exclude satisfied
    three = {"dog": [det("dog", 0.95, 10 * i, 0, 10 * i + 1, 1) for i in range(3)]}
    assert evaluate_geneval(three, meta, no_colors) == (True, 1.0)
    four = {"dog": [det("dog", 0.95, 10 * i, 0, 10 * i + 1, 1) for i in range(4)]}
    ok, credit = evaluate_geneval(four, meta, no_colors)
    assert not ok and credit == pytest.approx(0.5)  # count met, too many: exclude fails


def test_colour_and_position_rules():
    meta = {
        "tag": "position",
        "include": [
            {"class": "cat", "count": 1},
            {"class": "dog", "count": 1, "color": "red", "position": ["left of", 0]},
        ],
    }
    cat = det("cat", 0.9, 80, 40, 100, 60)
    dog_left = det("dog", 0.9, 0, 40, 20, 60)
    dog_right = det("dog", 0.9, 120, 40, 140, 60)
    red = lambda cls, found: ["red"] * len(found)  # noqa: E731
    blue = lambda cls, found: ["blue"] * len(found)  # noqa: E731
    assert evaluate_geneval({"cat": [cat], "dog": [dog_left]}, meta, red) == (True, 1.0)
    ok, credit = evaluate_geneval({"cat": [cat], "dog": [dog_right]}, meta, red)
    assert not ok and credit == pytest.approx(3 / 4)  # cat count, dog count, colour ok; position wrong
    ok, credit = evaluate_geneval({"cat": [cat], "dog": [dog_left]}, meta, blue)
    assert not ok and credit == pytest.approx(3 / 4)  # wrong colour, but position still credited
    ok, credit = evaluate_geneval({"dog": [dog_left]}, meta, red)
    assert not ok and credit == pytest.approx(2 / 4)  # no cat: nothing to be left of
    # two objects
    two = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    assert evaluate_geneval({"cat": [cat]}, two, no_colors) == (False, 0.5)
    assert geneval_classes({**meta, "exclude": [{"class": "bird", "count": 1}]}) == ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def tiny_geneval(tmp_path_factory):
    root = tmp_path_factory.mktemp("geneval")
    spec = GenEvalReward(
        name="geneval",
        model=str(save_tiny_owlv2(root / "owl")),
        clip_model=str(save_tiny_clip(root / "clip")),
    )
    reward = build_reward(spec)
    reward.setup("cpu")
    return reward


def test_owlv2_and_clip_colour_through_real_loading(tiny_geneval, monkeypatch):
    r = tiny_geneval
    image = torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(0))
    dets = r.detect(image, ["dog", "cat"])
    assert len(dets) == (32 // 8) ** 2  # one box per patch of the 32 px tiny detector
    assert {d.cls for d in dets} <= {"dog", "cat"} and all(0 <= d.score <= 1 for d in dets)
    colors = r._colors(image, "dog", [det("dog", 1, 0, 0, 20, 20), det("dog", 1, 10, 10, 48, 40)])
    assert len(colors) == 2 and set(colors) <= set(COLORS)
    # end to end with a fake detection list: the real colour classifier decides the colour check
    fake = [det("dog", 0.95, 0, 0, 20, 20)]
    monkeypatch.setattr(r, "detect", lambda img, classes: fake)
    want = r._colors(image, "dog", fake)[0]
    metas = [
        {"tag": "color_attr", "include": [{"class": "dog", "count": 1, "color": want}]},
        {},
        {"tag": "counting", "include": [{"class": "dog", "count": 2}]},
    ]
    out = r(image[None].expand(3, -1, -1, -1), ["a", "b", "c"], metas)
    assert out.scores[0].item() == 1.0 and out.extras["binary"][0].item() == 1.0
    assert math.isnan(out.scores[1].item()) and math.isnan(out.extras["binary"][1].item())
    assert out.scores[2].item() == 0.5 and out.extras["binary"][2].item() == 0.0  # one dog of two


def test_score_all_eval_mode_reports_binary_accuracy(tiny_geneval, monkeypatch):
    from marble.rewards import score_all

    monkeypatch.setattr(tiny_geneval, "detect", lambda img, classes: [det("dog", 0.95, 0, 0, 20, 20)])
    meta = [{"tag": "counting", "include": [{"class": "dog", "count": 2}]}, {}]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    train = score_all([tiny_geneval], images, ["a", "b"], meta)
    evaluation = score_all([tiny_geneval], images, ["a", "b"], meta, mode="eval")
    assert train[0, 0].item() == 0.5 and evaluation[0, 0].item() == 0.0  # partial credit vs. binary
    assert math.isnan(train[1, 0].item()) and math.isnan(evaluation[1, 0].item())
