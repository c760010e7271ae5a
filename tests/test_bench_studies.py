"""The benchmark studies run end to end on a minimal setting and produce the keys the README table
and bench/README.md read. No speed, cosine or reward value is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import alignment, alignment_replay, common, readme_table, reward_balance, throughput
from tests._train_helpers import train_config

pytestmark = pytest.mark.tiny_model  # loads the built tiny model (tests/conftest.py)


@pytest.fixture(scope="module")
def small_cfg(tiny_config):
    # 2 prompts x 2 images, 2 solver steps (1 trained timestep), micro-batches of 2: 2 steps per epoch
    return train_config(
        tiny_config,
        sampling={"num_steps": 2, "group_size": 2, "prompts_per_epoch": 2, "batch_size": 4},
        train={"micro_batch_size": 2, "gradient_accumulation_steps": 1, "diagnostics_every": 0},
        balancer={"kind": "marble"},
    )


def test_throughput_keys(small_cfg, tmp_path):
    with pytest.raises(ValueError, match="must name two of the timed presets"):
        throughput.run(small_cfg, tmp_path, presets=["weighted_sum"], repeats=1, pair=("weighted_sum", "gdpo"),
                       pair_repeats=1)  # fmt: skip
    res = throughput.run(
        small_cfg, tmp_path, presets=["weighted_sum", "marble_ub"], repeats=1, threads=1, memory=False,
        pair=("weighted_sum", "marble_ub"), pair_repeats=2,
    )  # fmt: skip
    h2h = res["head_to_head"]
    assert h2h["presets"] == ["weighted_sum", "marble_ub"] and h2h["rounds"] == 2
    assert len(res["raw_steps"]["marble_ub"]) == 1  # the head-to-head rounds are kept apart
    raw = h2h["raw_step_ms"]
    assert h2h["speed"] == pytest.approx(common.median(raw["weighted_sum"]) / common.median(raw["marble_ub"]))
    assert h2h["speed_ci95"][0] <= h2h["speed_ci95"][1]
    for key in ("machine", "versions", "marble", "load_average", "settings", "presets", "raw_steps"):
        assert key in res
    for name in ("weighted_sum", "marble_ub"):
        s = res["presets"][name]
        for key in (
            "step_ms_amortized",
            "speed_vs_weighted_sum",
            "micro_step_ms_median",
            "gram_ms_per_refresh",
            "speed_vs_weighted_sum_ci95",
        ):
            assert key in s
        assert s["steps_measured"] == 1
    # marble_ub refreshes on every micro-step; weighted_sum never does
    assert all(res["raw_steps"]["marble_ub"][0]["micro_refresh"])
    assert not any(res["raw_steps"]["weighted_sum"][0]["micro_refresh"])
    assert throughput.plot(res, tmp_path / "t.png").stat().st_size > 0
    json.dumps(common._clean(res), allow_nan=False)  # strict JSON


@pytest.mark.slow  # over 10 s on the 2-core machine: `make test-slow`
def test_alignment_keys(small_cfg, tmp_path):
    res = alignment.run(small_cfg, tmp_path, epochs=1, grams_out=tmp_path / "grams.npz")
    n = len(res["raw_batches"])
    assert n > 0
    for name in (*common.PRESETS, *alignment.DIRECTIONS_EXTRA):
        assert res["directions"][name]["all_batches"]["batches"] == n
        assert res["directions"][name]["all_steps"]["batches"] == len(res["raw_steps"])
    assert "later_batches" in res["directions"]["marble"]
    assert set(res["gram_sources"]["gram_ms_median"]) == {"params", *alignment.PROXY_SOURCES}
    for key in ("alpha_l1_median", "argmax_agree_frac", "direction_cos_median"):
        assert key in res["gram_sources"]
    # the fresh MGDA direction is the min-norm point: no reward gradient at an obtuse angle to it, up to
    # the QP solver's accuracy (osqp on the tiny world's Grams, whose reward norms differ by orders of
    # magnitude: cosines within ~3e-4 of the exact solution, measured)
    assert res["directions"]["fresh_mgda"]["all_batches"]["worst_min_cos"] > -1e-3
    assert alignment.plot(res, tmp_path / "a.png").stat().st_size > 0
    # the README renders the micro-batch comparison from the results at each size
    common.write_json(tmp_path / "alignment.json", res)
    other = {**res, "settings": {**res["settings"], "micro_batch_size": 8}}
    common.write_json(tmp_path / "alignment_mb8.json", other)
    text = readme_table.render(tmp_path)
    assert "micro-batch 8 x" in text and "micro-batch 2 x" in text and "per optimizer step" in text
    # the replay on the saved Grams reproduces every preset's per-batch cosines of the run itself
    saved = alignment_replay.Saved(tmp_path / "grams.npz")
    assert len(res["raw_steps"]) == saved.S and n == saved.S * saved.M
    for name in ("equal", "marble", "marble_paper", "marble_full", "pcgrad"):
        bal = common.balancer_config(small_cfg, name)
        micro, _ = alignment_replay.replay(saved, alignment_replay.build(bal, saved))
        measured = [b["directions"][name]["min"] for b in res["raw_batches"]]
        np.testing.assert_allclose([m for m, _ in micro], measured, atol=1e-3, err_msg=name)  # QP accuracy


def _fake_reward_runs(cfg) -> list[dict]:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(16, len(cfg.rewards)))
    runs = []
    for p in ("weighted_sum", "marble"):
        for seed in (0, 1):
            runs.append(
                {"preset": p, "seed": seed, "train_seconds": 1.0,
                 "eval": reward_balance.run_stats(cfg, base, base + rng.normal(0.1, 0.1, size=base.shape))}
            )  # fmt: skip
    return runs


def test_reward_balance_aggregate_and_readme(small_cfg, tmp_path):
    runs = _fake_reward_runs(small_cfg)
    agg = reward_balance.aggregate(small_cfg, runs, ["weighted_sum", "marble"])
    for p in ("weighted_sum", "marble"):
        assert set(agg[p]["rewards"]) == {r.name for r in small_cfg.rewards}
        assert {"improves_all_mean", "improves_all_ci", "mean_delta_std_units_trained"} <= set(agg[p])
        assert agg[p]["rewards"][small_cfg.rewards[0].name]["delta"]["n"] == 2
    pair = reward_balance.paired(small_cfg, runs, "marble", "weighted_sum")
    name = small_cfg.rewards[0].name
    by = {(r["preset"], r["seed"]): r["eval"][name]["delta_std_units"] for r in runs}
    assert pair["seeds"] == [0, 1]  # per-seed differences, checked by hand
    assert pair["rewards"][name]["per_seed"] == pytest.approx(
        [by["marble", s] - by["weighted_sum", s] for s in (0, 1)]
    )
    assert pair["rewards"][name]["diff"]["mean"] == pytest.approx(np.mean(pair["rewards"][name]["per_seed"]))
    assert reward_balance.paired(small_cfg, runs, "marble", "gdpo") is None  # no common seed
    cmd = reward_balance.train_command("marble", 1, 2, Path("p"), Path("o"), [])
    assert cmd[3:5] == ["train", "--config"] and "train.seed=1" in cmd and "train.epochs=2" in cmd
    # the README section renders from whatever results exist and replaces only the marked block
    env = common.environment()
    result = {"benchmark": "reward_balance", **env, "load_average": {"start": [0.0]},
              "settings": {"optimizer_steps": 2, "seeds": [0, 1], "eval_images": 16, "eval_prompts": 8,
                           "eval_images_per_prompt": 2, "eval_num_steps": 4, "eval_weights": "ema",
                           "rewards_trained": small_cfg.trained_reward_names,
                           "rewards_held_out": [r.name for r in small_cfg.rewards if r.held_out]},
              "conditioning": {"color": 0.8, "color_chance": 0.125, "images": 32, "position": 0.6,
                               "position_chance": 0.25, "positional_images": 16},
              "presets": agg, "paired": [pair], "runs": runs}  # fmt: skip
    common.write_json(tmp_path / "reward_balance.json", result)
    assert reward_balance.plot(result, tmp_path / "r.png").stat().st_size > 0
    text = readme_table.render(tmp_path)
    assert "| `marble` |" in text and "Per-reward change" in text
    assert "colour accuracy 80%" in text and "`marble` - `weighted_sum`, paired on seeds [0, 1]" in text
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nkept\n")
    readme_table.update_readme(readme, text)
    readme_table.update_readme(readme, text)  # idempotent: one block
    body = readme.read_text()
    assert body.startswith("# title\n\nkept\n") and body.count(readme_table.START) == 1
    # a longer run of the same study, kept beside make bench's, renders after it under its own heading
    assert "separate run" not in text
    long = {**result, "settings": {**result["settings"], "optimizer_steps": 37}}
    common.write_json(tmp_path / f"{readme_table.LONG_STUDY}.json", long)
    both = readme_table.render(tmp_path)
    assert both.startswith(text.rstrip("\n"))  # make bench's own sections unchanged, first
    tail = both[len(text.rstrip("\n")) :]
    assert "### The reward study at 37 optimizer steps (a separate run)" in tail
    # the command it prints reproduces the run: its seeds and images per prompt, not the CLI's defaults
    assert "`python -m bench.reward_balance --epochs 37 --seeds 0 1 --images-per-prompt 2 --out" in tail
    assert "Rewards: 37 optimizer steps per run" in tail and tail.count("Per-reward change") == 1
    assert "`marble` - `weighted_sum`, paired on seeds [0, 1]" in tail


@pytest.mark.parametrize(
    ("startup", "epoch_s", "runs", "workers", "left", "min_epochs", "max_epochs"),
    [(6.7, 3.4, 30, 2, 900.0, 2, 40), (5.0, 1.0, 30, 2, 10_000.0, 2, 40), (2.0, 4.0, 27, 2, 30.0, 2, 40),
     (0.0, 4.0, 9, 3, 250.0, 3, 40), (3.0, 4.0, 30, 2, -5.0, 2, 40), (20.0, 1.5, 30, 2, 700.0, 2, 60)],
)  # fmt: skip
def test_epochs_that_fit_matches_brute_force(startup, epoch_s, runs, workers, left, min_epochs, max_epochs):
    """`runs` runs to E epochs, `workers` at a time, fit with the margin to spare."""

    def cost(e: int) -> float:
        return runs * (startup + e * epoch_s) / workers

    fits = [e for e in range(min_epochs, max_epochs + 1) if reward_balance.TIME_MARGIN * cost(e) <= left]
    expected = max(fits, default=min_epochs)
    assert reward_balance.epochs_that_fit(
        run_startup_s=startup, run_epoch_s=epoch_s, runs=runs, workers=workers, seconds_left=left,
        min_epochs=min_epochs, max_epochs=max_epochs,
    ) == expected  # fmt: skip


def test_reward_balance_jobs_give_the_core_presets_every_seed():
    jobs = reward_balance.job_list(
        ["marble", "equal", "weighted_sum"], [0, 1, 2], [0], ["marble", "weighted_sum"]
    )
    assert jobs == [("marble", 0), ("equal", 0), ("weighted_sum", 0), ("marble", 1), ("weighted_sum", 1),
                    ("marble", 2), ("weighted_sum", 2)]  # fmt: skip
    assert len(reward_balance.job_list(["marble", "equal"], [0, 1], None, ["marble"])) == 4


def test_alignment_micro_batch_override(small_cfg):
    # small_cfg: 4 samples per epoch
    assert alignment.micro_batch_overrides(small_cfg, 4) == [
        "train.micro_batch_size=4",
        "train.gradient_accumulation_steps=1",
    ]
    with pytest.raises(SystemExit, match="--micro-batch 3 must divide the epoch's 4 samples"):
        alignment.micro_batch_overrides(small_cfg, 3)


def test_balancer_overhead_writes_json_and_plot(tmp_path):
    from bench import balancer_overhead

    out = tmp_path / "bo.json"
    args = [
        "--K",
        "3",
        "--dim",
        "16",
        "--hidden",
        "32",
        "--layers",
        "2",
        "--repeats",
        "2",
        "--qp-problems",
        "5",
    ]
    res = balancer_overhead.main([*args, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["settings"]["K"] == 3 and "out" not in saved["settings"]
    assert {"commit", "dirty"} <= set(saved["marble"]) and saved["step"]["num_params"] == res["step"][
        "num_params"
    ]
    assert out.with_suffix(".png").stat().st_size > 0
