"""The prompt-level reading of the reward study (`bench.prompt_level`): per-prompt deltas against a
brute-force loop and against the study's own per-seed figure, the attribute tables and the held-out
prediction by hand, the paired counts, and the refusal of a work directory the study JSON does not
describe."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import common, eval_scores, prompt_level, readme_table, reward_balance


def _scores(seed: int = 0, prompts: int = 5, images: int = 4, seeds: int = 3):
    """Prompt ids, base `[N]`, adapters `[S][N]`; the last prompt unscored (NaN), as a specialist's."""
    rng = np.random.default_rng(seed)
    ids = [f"p{i}" for i in range(prompts) for _ in range(images)]
    base = rng.normal(size=len(ids))
    base[-images:] = np.nan
    adapters = [base + rng.normal(0.3, 1.0, size=len(ids)) for _ in range(seeds)]
    return ids, base, adapters


def test_per_prompt_deltas_match_a_brute_force_loop():
    ids, base, adapters = _scores()
    sd = np.nanstd(base)
    got = prompt_level.per_prompt_deltas(ids, base, adapters)
    assert set(got) == {"p0", "p1", "p2", "p3"}  # p4 is not scored
    for pid, value in got.items():
        cells = [(a[i] - base[i]) / sd for a in adapters for i, q in enumerate(ids) if q == pid]
        assert value == pytest.approx(sum(cells) / len(cells))


def test_per_seed_means_are_the_reward_studys_figure():
    """The seed figure is `bench.reward_balance.run_stats`' delta in base-std units, run by run; with
    equally many images per prompt, the prompts' mean is the seeds' mean."""
    ids, base, adapters = _scores(seed=1)
    cfg = common.bench_config()
    k = [r.name for r in cfg.rewards].index("color_match")
    per_seed = prompt_level.per_seed_means(base, adapters)
    for a, got in zip(adapters, per_seed, strict=True):
        b_all = np.full((len(base), len(cfg.rewards)), 0.5)
        a_all = b_all + 0.1
        b_all[:, k], a_all[:, k] = base, a
        assert got == pytest.approx(
            reward_balance.run_stats(cfg, b_all, a_all)["color_match"]["delta_std_units"]
        )
    per_prompt = prompt_level.per_prompt_deltas(ids, base, adapters)
    assert np.mean(list(per_prompt.values())) == pytest.approx(np.mean(per_seed))


def test_an_unscored_or_constant_reward_gives_nothing():
    ids = ["a", "a", "b", "b"]
    assert prompt_level.per_prompt_deltas(ids, np.full(4, np.nan), [np.zeros(4)]) == {}
    assert prompt_level.per_prompt_deltas(ids, np.ones(4), [np.zeros(4)]) == {}
    assert prompt_level.per_seed_means(np.ones(4), [np.zeros(4)]) == []


def test_attribute_tables_and_the_held_out_prediction_by_hand():
    shape = {
        "t1": "square",
        "t2": "square",
        "t3": "ring",
        "h1": "square",
        "h2": "square",
        "h3": "ring",
        "x": None,
    }
    train = {"t1": -1.0, "t2": -0.5, "t3": 2.0}
    table = prompt_level.by_value(train, shape)
    assert table == {"ring": {"mean": 2.0, "prompts": 1}, "square": {"mean": -0.75, "prompts": 2}}
    # held-out: two squares and one ring -> (2 * -0.75 + 2.0) / 3
    assert prompt_level.predicted_from(table, ["h1", "h2", "h3"], shape) == pytest.approx(0.5 / 3)
    # a held-out value the training prompts lack: no prediction rather than a partial one
    assert prompt_level.predicted_from(table, ["h1", "x"], shape) is None
    assert prompt_level.predicted_from(table, [], shape) is None
    assert prompt_level.by_value({"x": 1.0}, shape) == {"none": {"mean": 1.0, "prompts": 1}}


def test_ahead_count_pairs_prompts_by_id():
    a = {"p1": 0.5, "p2": -0.2, "p3": 1.0, "only_a": 9.0}
    b = {"p1": 0.1, "p2": 0.0, "p3": 1.0}
    got = prompt_level.ahead_count(a, b)
    assert got["prompts"] == 3 and got["ahead"] == 1  # p1 ahead, p2 behind, p3 level
    assert got["mean"] == pytest.approx((0.4 - 0.2 + 0.0) / 3) and got["ci_lo"] < got["mean"] < got["ci_hi"]


def _study(tmp_path, steps_written: dict[tuple[str, int], int | None]):
    study = {
        "settings": {
            "core_presets": ["marble_step", "weighted_sum"],
            "seeds_per_preset": {"marble_step": [0, 1], "weighted_sum": [0, 1], "pcgrad": [0]},
            "optimizer_steps": 7,
        }
    }
    for (preset, seed), steps in steps_written.items():
        run = tmp_path / "reward_balance" / f"{preset}-seed{seed}"
        run.mkdir(parents=True)
        if steps is not None:
            (run / "train_summary.json").write_text(json.dumps({"steps": steps}))
    return study


def test_study_runs_are_the_core_presets_at_the_studys_steps(tmp_path):
    runs = {(p, s): 7 for p in ("marble_step", "weighted_sum") for s in (0, 1)}
    got = prompt_level.study_runs(_study(tmp_path, runs), tmp_path)
    assert [(p, s) for p, s, _ in got] == list(runs)  # pcgrad is not a core preset
    assert got[0][2] == tmp_path / "reward_balance" / "marble_step-seed0" / "adapter"


def test_study_runs_refuse_runs_the_study_does_not_describe(tmp_path):
    runs = {(p, s): 7 for p in ("marble_step", "weighted_sum") for s in (0, 1)}
    runs[("weighted_sum", 1)] = 2  # a later, shorter study wrote over this run
    with pytest.raises(
        ValueError, match=r"weighted_sum-seed1/train_summary.json: steps = 2.*optimizer_steps = 7"
    ):
        prompt_level.study_runs(_study(tmp_path / "a", runs), tmp_path / "a")
    runs[("weighted_sum", 1)] = None
    with pytest.raises(FileNotFoundError, match=r"weighted_sum-seed1/train_summary.json: missing"):
        prompt_level.study_runs(_study(tmp_path / "b", runs), tmp_path / "b")


def test_plot_draws_the_specialists(tmp_path):
    att = {
        "train": {"square": {"mean": -0.5, "prompts": 2}, "ring": {"mean": 1.0, "prompts": 2}},
        "test": {"square": {"mean": -0.8, "prompts": 4}},
        "test_predicted_from_train": -0.5,
        "test_observed": -0.8,
    }
    rewards = {
        "color_match": {"splits": {"test": {"prompts": 8}}, "attributes": {"shape": att}},
        "brightness": {"splits": {"test": {"prompts": 24}}, "attributes": {"shape": att}},
    }
    result = {
        "settings": {"prompts": {"test": 24}},
        "presets": {"marble_step": {"seeds": [0, 1], "rewards": rewards}},
    }
    path = prompt_level.plot(result, tmp_path / "p.png")
    assert path.stat().st_size > 1000 and not list(tmp_path.glob("*.tmp.png"))


def _split(rewards: int = 3, seed: int = 0) -> eval_scores.SplitScores:
    ids, base, adapters = _scores(seed=seed)
    wide = lambda col: np.stack([col + k for k in range(rewards)], axis=1)  # noqa: E731
    runs = {("marble_step", s): wide(a) for s, a in enumerate(adapters)}
    return eval_scores.SplitScores(ids, [f"a red square {i}" for i in ids], wide(base), runs)


def test_eval_scores_round_trip_and_refusals(tmp_path):
    splits = {"test": _split(), "train": _split(seed=3)}
    path = eval_scores.save(tmp_path / eval_scores.SCORES_FILE, ["a", "b", "c"], splits)
    names, got = eval_scores.load(path)
    assert names == ["a", "b", "c"] and set(got) == {"test", "train"}
    for split, s in splits.items():
        assert got[split].prompt_ids == s.prompt_ids and got[split].prompts == s.prompts
        np.testing.assert_array_equal(got[split].base, s.base)  # NaN where the reward scores nothing
        assert set(got[split].runs) == set(s.runs)
        for key, a in s.runs.items():
            np.testing.assert_array_equal(got[split].runs[key], a)
    with pytest.raises(ValueError, match=r"x.npz: test/base: shape \(20, 3\), expected \(20, 2\)"):
        eval_scores.save(tmp_path / "x.npz", ["a", "b"], {"test": _split()})
    np.savez(tmp_path / "bad.npz", rewards=np.asarray(["a"]), **{"test/base": np.zeros((1, 1)), "test/oops": np.zeros((1, 1)),
             "test/prompt_ids": np.asarray(["p"]), "test/prompts": np.asarray(["t"])})  # fmt: skip
    with pytest.raises(ValueError, match="'test/oops' is not <split>/<preset>-seed<seed>"):
        eval_scores.load(tmp_path / "bad.npz")


def test_stored_scores_are_used_only_when_they_are_the_studys(tmp_path):
    rewards = ["a", "b", "c"]
    splits = {"test": _split(), "train": _split(seed=3)}
    (tmp_path / "reward_balance").mkdir()
    eval_scores.save(tmp_path / "reward_balance" / eval_scores.SCORES_FILE, rewards, splits)
    base = splits["test"].base
    means = {n: float(np.nanmean(base[:, k])) for k, n in enumerate(rewards)}
    runs = [("marble_step", s, tmp_path) for s in range(3)]
    got = prompt_level.stored_scores({"base_means": means}, tmp_path, runs, rewards)
    assert got is not None and set(got["train"].runs) == {("marble_step", s) for s in range(3)}
    # another study's base, a run the file lacks, other rewards: not this study's scores
    assert (
        prompt_level.stored_scores({"base_means": {**means, "b": means["b"] + 1e-6}}, tmp_path, runs, rewards)
        is None
    )
    assert (
        prompt_level.stored_scores({"base_means": means}, tmp_path, [*runs, ("gdpo", 0, tmp_path)], rewards)
        is None
    )
    assert prompt_level.stored_scores({"base_means": means}, tmp_path, runs, ["a", "c", "b"]) is None
    assert prompt_level.stored_scores({"base_means": means}, tmp_path / "elsewhere", runs, rewards) is None


def test_readme_table_lists_the_specialists_only():
    ci = {"mean": -0.2, "ci_lo": -0.4, "ci_hi": 0.1, "n": 5}
    entry = lambda n_test: {  # noqa: E731
        "splits": {"test": {"prompts": n_test, "across_prompts": ci, "across_seeds": ci},
                   "train": {"prompts": 3 * n_test, "across_prompts": ci, "across_seeds": ci}},
        "attributes": {"shape": {"test_predicted_from_train": -0.25}},
    }  # fmt: skip
    pl = {
        "settings": {"prompts": {"test": 24, "train": 72}},
        "presets": {"marble_step": {"rewards": {"brightness": entry(24), "color_match": entry(8)}}},
    }
    lines = readme_table.prompt_level_table(pl)
    rows = [line for line in lines if line.startswith("| `")]
    assert rows == [
        "| `marble_step` | `color_match` | 8 | -0.20 [-0.40, +0.10] | -0.20 [-0.40, +0.10] | -0.25 | 24 | -0.20 [-0.40, +0.10] |"
    ]
    pl["presets"]["marble_step"]["rewards"] = {"brightness": entry(24)}
    assert readme_table.prompt_level_table(pl) == []
