"""The evaluation contract: eval.json round-trips, NaN is null, old or malformed files are refused."""

from __future__ import annotations

import json
import math

import pytest
from _eval_helpers import NAN, interval, reward, scores, summary

from marble.eval.contract import SCHEMA_VERSION, EvalContractError, EvalSummary, ScaleStats


def _summary():
    pick = reward(2.0, (1.0, 3.0), 21.0, kind="pickscore")
    pick.scale = "raw"
    pick.training = ScaleStats(
        base=interval(19.0 / 26), adapter=interval(21.0 / 26), base_std=1.0 / 26,
        delta=interval(2.0 / 26, 1.0 / 26, 3.0 / 26), win_rate=0.5,
    )  # fmt: skip
    rewards = {"pickscore": pick, "ocr": reward(NAN, (NAN, NAN), NAN, n=0, kind="ocr")}
    return summary(scores(rewards, {"dark_fraction": 0.1}))


def test_round_trip_with_nan_as_null(tmp_path):
    ev = _summary()
    path = ev.write(tmp_path / "eval.json")
    raw = json.loads(path.read_text())  # strict JSON: no NaN literal anywhere
    assert raw["schema_version"] == SCHEMA_VERSION
    assert raw["rewards"]["ocr"]["delta"]["mean"] is None
    assert raw["gate_preview"]["summary"] == ev.gate_preview.summary()
    back = EvalSummary.load(path)
    assert math.isnan(back.rewards["ocr"].delta.mean) and back.rewards["ocr"].delta.n == 0
    assert back.rewards["pickscore"].training.adapter.mean == pytest.approx(21.0 / 26)
    assert back.to_json() == ev.to_json()


def test_flat_metrics_carry_both_scales():
    flat = _summary().flat_metrics()
    assert flat["adapter/pickscore"] == 21.0  # the paper's scale
    assert flat["training/adapter/pickscore"] == pytest.approx(21.0 / 26)  # the training scale beside it
    assert flat["delta/ocr"] is None and "training/delta/ocr" not in flat
    assert flat["monitor/shift/dark_fraction"] == pytest.approx(0.1)


def test_another_schema_version_is_refused_with_the_path(tmp_path):
    path = tmp_path / "eval.json"
    data = json.loads(_summary().to_json())
    data["schema_version"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(EvalContractError, match=r"eval\.json: schema_version 1.*re-run `marble evaluate`"):
        EvalSummary.load(path)


def test_a_malformed_field_is_named(tmp_path):
    path = tmp_path / "eval.json"
    data = json.loads(_summary().to_json())
    data["rewards"]["pickscore"]["delta"]["n"] = "many"
    path.write_text(json.dumps(data))
    with pytest.raises(EvalContractError, match=r"rewards\.pickscore\.delta\.n"):
        EvalSummary.load(path)
    path.write_text("{not json")
    with pytest.raises(EvalContractError, match="not valid JSON"):
        EvalSummary.load(path)
