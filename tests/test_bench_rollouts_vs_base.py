"""Training rewards against the base run on the same rollouts (`bench.rollouts_vs_base`): the paired
differences and their summaries against hand-computed values, the refusal of unpaired runs, the base
run's command and the README table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import readme_table, reward_balance, rollouts_vs_base
from bench.rollouts_vs_base import BASE, FROZEN_LR

REWARDS = ["color_match", "brightness"]


def _rows(values: dict[str, list[float | None]]) -> list[dict]:
    steps = len(next(iter(values.values())))
    return [{"step": i + 1, **{f"train/reward/{n}": v[i] for n, v in values.items()}} for i in range(steps)]


def _write(run_dir: Path, values: dict[str, list[float | None]]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(values)))


def test_paired_curves_are_the_step_by_step_differences():
    base = _rows({"color_match": [0.4, 0.3, None, 0.5], "brightness": [0.2, 0.2, 0.2, 0.2]})
    run = _rows({"color_match": [0.4, 0.5, 0.6, 0.1], "brightness": [0.2, 0.25, 0.3, 0.35]})
    got = rollouts_vs_base.paired_curves(run, base, REWARDS, "run")
    assert got["color_match"][:2] == pytest.approx([0.0, 0.2]) and got["color_match"][2] is None
    assert got["color_match"][3] == pytest.approx(-0.4)
    assert got["brightness"] == pytest.approx([0.0, 0.05, 0.1, 0.15])
    shorter = rollouts_vs_base.paired_curves(run[:2], base, REWARDS, "run")  # common steps only
    assert len(shorter["brightness"]) == 2


def test_runs_that_differ_at_step_one_are_refused():
    base = _rows({"color_match": [0.4, 0.3], "brightness": [0.2, 0.2]})
    run = _rows({"color_match": [0.41, 0.3], "brightness": [0.2, 0.2]})
    with pytest.raises(ValueError, match=r"runs/marble-seed0: step 1 train/reward/color_match = 0\.41"):
        rollouts_vs_base.paired_curves(run, base, REWARDS, "runs/marble-seed0")
    with pytest.raises(ValueError, match="no common steps"):
        rollouts_vs_base.paired_curves([], base, REWARDS, "runs/marble-seed0")


def test_summarise_windows_and_last_third_against_numpy():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(3, 13))  # 3 seeds, 13 steps: windows 1, 2-7, 8-13; last third = 4 steps
    table[1, 12] = np.nan  # a step without a valid sample
    per_seed = {
        s: {n: [None if math.isnan(x) else float(x) for x in table[i]] for n in REWARDS}
        for i, s in enumerate((0, 1, 2))
    }
    got = rollouts_vs_base.summarise(per_seed, REWARDS)["color_match"]
    assert [w["steps"] for w in got["windows"]] == [[1, 1], [2, 7], [8, 13]]
    assert got["windows"][0]["mean"] == pytest.approx(table[:, 0].mean())
    assert got["windows"][1]["mean"] == pytest.approx(table[:, 1:7].mean())
    assert got["windows"][2]["mean"] == pytest.approx(np.nanmean(table[:, 7:13]))
    assert got["last"]["steps"] == [10, 13]
    expected = [np.nanmean(table[i, -4:]) for i in range(3)]
    assert got["last"]["per_seed"] == pytest.approx(expected)
    assert got["last"]["mean"] == pytest.approx(np.mean(expected)) and got["last"]["n"] == 3
    assert got["last"]["ci_lo"] < got["last"]["mean"] < got["last"]["ci_hi"]


def test_study_pairs_each_preset_with_the_base_run_of_its_seed(tmp_path):
    for s, offset in ((0, 0.0), (1, 0.1)):
        base = {"color_match": [0.3 + offset, 0.3, 0.3], "brightness": [0.5, 0.5, 0.5]}
        _write(tmp_path / f"{BASE}-seed{s}", base)
        _write(
            tmp_path / f"weighted_sum-seed{s}",
            {"color_match": [0.3 + offset, 0.2, 0.1], "brightness": [0.5, 0.6, 0.7]},
        )
    _write(tmp_path / "marble-seed0", {"color_match": [0.3, 0.4, 0.5], "brightness": [0.5, 0.5, 0.5]})
    got = rollouts_vs_base.study(tmp_path, ["weighted_sum", "marble", "gdpo"], [0, 1], REWARDS)
    assert set(got["presets"]) == {"weighted_sum", "marble"}  # gdpo has no run
    assert got["presets"]["weighted_sum"]["seeds"] == [0, 1] and got["presets"]["marble"]["seeds"] == [0]
    ws = got["presets"]["weighted_sum"]["rewards"]
    assert ws["color_match"]["last"]["mean"] == pytest.approx(-0.2)  # last third = step 3
    assert ws["brightness"]["windows"][0]["mean"] == pytest.approx((0 + 0.1 + 0.2) / 3)
    assert got["presets"]["marble"]["rewards"]["color_match"]["last"]["mean"] == pytest.approx(0.2)
    text = "\n".join(readme_table.rollouts_table(got))
    assert "steps 3-3" in text and "| `weighted_sum` | 2 | -0.200 [-0.200, -0.200] |" in text
    with pytest.raises(FileNotFoundError, match="base-seed2"):
        rollouts_vs_base.study(tmp_path, ["weighted_sum"], [0, 2], REWARDS)


def test_the_base_run_is_the_weighted_sum_at_a_frozen_learning_rate():
    cmd = reward_balance.train_command(BASE, 3, 5, Path("p"), Path("o"), ["train.lr=1e-3"])
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert FROZEN_LR in sets and any('"kind": "weighted_sum"' in s for s in sets)
    assert "train.seed=3" in sets and "train.epochs=5" in sets
    assert sets[-1] == FROZEN_LR  # after the study's own overrides: the last one wins
