"""The reward study's figures at the level of prompts: how much of a held-out figure is which prompts.

`bench.reward_balance` reports per preset and reward a mean over seeds with an interval ACROSS SEEDS:
the evaluation prompts are fixed, so that interval says how much training varies, not how far a figure
would move on other prompts of the same world. A specialist reward scores only its own prompts (on the
committed split, 8 held-out colour prompts for `color_match`, 4 positional ones for `position_match`),
so its held-out figure is a mean over a handful of prompts.

This study re-evaluates the study's saved adapters (its core presets, every seed, the study's protocol:
EMA weights, the same initial noise, the same images per prompt) on the held-out and the training
prompts and reports per preset and reward:
- `splits`: per split, the delta in base-std units (the study's unit) with a 95% t-interval across
  PROMPTS (each prompt's delta is its mean over seeds and images) beside the one across seeds;
- `paired`: for each of the study's pairs (a, b), a - b per prompt: the interval across prompts and on
  how many prompts a is ahead;
- `attributes`: per prompt attribute of the tiny world (colour, shape, position), the delta for each
  value on each split, and the held-out delta PREDICTED from the training prompts: each held-out
  prompt takes the training delta of its value, averaged over the held-out prompts. The split balances
  colours and positions (`marble.data.mixing.stratified_split`), not shapes; a prediction close to
  the observed figure says the split's mix of that attribute accounts for the gap between the splits.

Run after the reward study, on its work directory: `python -m bench.prompt_level` (make bench does).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench import common, eval_scores
from bench.eval_scores import SCORES_FILE, SplitScores
from bench.reward_balance import OUT_JSON as STUDY_JSON
from bench.reward_balance import PAIRS, Evaluator
from marble.data.tiny_world import named_colors, named_position, named_shape
from marble.runview import TRAIN_SUMMARY
from marble.threads import pinned_threads

log = logging.getLogger(__name__)

OUT_JSON = common.RESULTS / "prompt_level.json"
SPLITS = ("test", "train")  # held-out, training

ATTRIBUTES: dict[str, Callable[[str], str | None]] = {
    "colour": lambda p: next(iter(named_colors(p)), None),
    "shape": named_shape,
    "position": named_position,
}


# ---------------------------------------------------------------------------------------------- the math
def per_prompt_deltas(
    prompt_ids: list[str], base: np.ndarray, adapters: list[np.ndarray]
) -> dict[str, float]:
    """Per prompt: the mean over seeds and the prompt's scored images of `(adapter - base) / std(base)`.

    `base` `[N]` and each of `adapters` `[N]` (one per seed) score the same N images (`prompt_ids[i]`
    is image i's prompt); NaN marks an image the reward does not score. The std is over the scored
    base images of the split, as `bench.reward_balance.run_stats` takes it. Prompts with no scored
    image are left out."""
    base = np.asarray(base, dtype=np.float64)
    valid, sd = _scored(base)
    if sd is None:
        return {}
    deltas = np.stack([np.asarray(a, dtype=np.float64) - base for a in adapters]) / sd  # [S, N]
    rows: dict[str, list[int]] = defaultdict(list)
    for i, pid in enumerate(prompt_ids):
        if valid[i]:
            rows[pid].append(i)
    return {pid: float(np.nanmean(deltas[:, idx])) for pid, idx in rows.items()}


def per_seed_means(base: np.ndarray, adapters: list[np.ndarray]) -> list[float]:
    """Per seed: the mean delta over the scored images in base-std units (the reward study's figure)."""
    base = np.asarray(base, dtype=np.float64)
    valid, sd = _scored(base)
    if sd is None:
        return []
    return [float(np.nanmean((np.asarray(a, dtype=np.float64) - base)[valid])) / sd for a in adapters]


def _scored(base: np.ndarray) -> tuple[np.ndarray, float | None]:
    """`[N]` the images the reward scored, and the std of their base scores (None: none scored, or
    all alike: no unit to measure a delta in)."""
    valid = np.isfinite(base)
    sd = float(np.std(base[valid])) if valid.any() else 0.0
    return valid, (sd if sd > 0 else None)


def by_value(per_prompt: dict[str, float], value_of: dict[str, str | None]) -> dict[str, dict[str, float]]:
    """Per attribute value: the mean of the prompts' deltas and how many prompts (prompts without the
    attribute are grouped under "none")."""
    groups: dict[str, list[float]] = defaultdict(list)
    for pid, d in per_prompt.items():
        groups[value_of[pid] or "none"].append(d)
    return {v: {"mean": float(np.mean(ds)), "prompts": len(ds)} for v, ds in sorted(groups.items())}


def predicted_from(
    train_by_value: dict[str, dict[str, float]], test_prompts: list[str], value_of: dict[str, str | None]
) -> float | None:
    """The held-out mean delta if every held-out prompt moved as the training prompts of its value did
    (the mean over `test_prompts` of their value's training mean); None when a held-out value has no
    training prompt."""
    if not test_prompts:
        return None
    preds = []
    for pid in test_prompts:
        v = train_by_value.get(value_of[pid] or "none")
        if v is None:
            return None
        preds.append(v["mean"])
    return float(np.mean(preds))


def ahead_count(per_prompt_a: dict[str, float], per_prompt_b: dict[str, float]) -> dict[str, Any]:
    """a - b per prompt (both deltas on the same images): the t-interval across prompts and the number
    of prompts on which a is ahead."""
    common_ids = sorted(set(per_prompt_a) & set(per_prompt_b))
    diffs = [per_prompt_a[p] - per_prompt_b[p] for p in common_ids]
    return {**common.t_interval(diffs), "ahead": int(sum(d > 0 for d in diffs)), "prompts": len(diffs)}


# ------------------------------------------------------------------------------------------- the study
def study_runs(study: dict[str, Any], work: Path) -> list[tuple[str, int, Path]]:
    """(preset, seed, adapter dir) of the study's core presets, checked against what the study JSON
    recorded: each run's train summary must have trained the study's number of optimizer steps."""
    s = study["settings"]
    steps = s.get("optimizer_steps")
    runs = []
    for preset in s["core_presets"]:
        for seed in s["seeds_per_preset"].get(preset, []):
            run_dir = work / "reward_balance" / f"{preset}-seed{seed}"
            summary = run_dir / TRAIN_SUMMARY
            if not summary.is_file():
                raise FileNotFoundError(
                    f"{summary}: missing (run the reward study first: python -m bench.reward_balance)"
                )
            got = json.loads(summary.read_text()).get("steps")
            if got != steps:
                raise ValueError(
                    f"{summary}: steps = {got!r}, but the study recorded optimizer_steps = {steps!r}: the work "
                    "directory holds other runs than the study's JSON describes"
                )
            runs.append((preset, seed, run_dir / "adapter"))
    if not runs:
        raise ValueError("prompt-level study: the reward study recorded no core preset runs")
    return runs


def stored_scores(
    study: dict[str, Any], work: Path, runs: list[tuple[str, int, Path]], rewards: list[str]
) -> dict[str, SplitScores] | None:
    """The study's own per-image scores (`bench.eval_scores`) when they are this study's: the same
    rewards, every core run on both splits, and the held-out base means the study JSON recorded. None
    otherwise (and why is logged): the caller then evaluates the adapters again."""
    path = work / "reward_balance" / SCORES_FILE
    if not path.is_file():
        log.info("prompt level: %s not found; evaluating the adapters", path)
        return None
    names, splits = eval_scores.load(path)
    missing = [
        (split, p, sd)
        for split in SPLITS
        for p, sd, _ in runs
        if (p, sd) not in getattr(splits.get(split), "runs", {})
    ]
    recorded = study.get("base_means", {})
    if names != rewards:
        why = f"rewards {names}, the config's {rewards}"
    elif missing:
        why = f"no scores of {missing[:3]}"
    elif not all(_same_mean(splits["test"].base[:, k], recorded.get(n)) for k, n in enumerate(names)):
        why = "held-out base means differ from the study JSON's base_means"
    else:
        return splits
    log.warning("prompt level: %s is not this study's (%s); evaluating the adapters", path, why)
    return None


def _same_mean(scores: np.ndarray, recorded: float | None) -> bool:
    finite = np.isfinite(scores)
    if recorded is None:
        return not finite.any()
    return finite.any() and math.isclose(
        float(np.mean(scores[finite])), recorded, rel_tol=1e-9, abs_tol=1e-12
    )


def evaluated_scores(
    cfg, work: Path, runs: list[tuple[str, int, Path]], eval_seeds: list[int]
) -> dict[str, SplitScores]:
    """Evaluate the runs' adapters on both splits (the reward study's `Evaluator`, same protocol)."""
    prompts = common.prepare_prompts(cfg, work)
    splits, pipe = {}, None
    for split in SPLITS:
        ev = Evaluator(cfg, prompts, split=split, pipe=pipe)
        pipe = ev.pipe
        if split == "test" and [j["seed"] for j in ev.jobs] != eval_seeds:
            raise ValueError("prompt level: the held-out images' seeds differ from the study's eval_seeds")
        splits[split] = ev.split_scores()
        for preset, seed, adapter in runs:
            splits[split].runs[(preset, seed)] = ev.adapter(adapter)
            log.info("prompt level: %s %s seed %d evaluated", split, preset, seed)
    return splits


def run(study_json: Path, work: Path, threads: int = 2) -> dict[str, Any]:
    """Read the study's core adapters per prompt on both splits (module docstring), from the scores the
    study stored or, if it stored none that match, by evaluating them again."""
    t_start = time.perf_counter()
    study = json.loads(study_json.read_text())
    s = study["settings"]
    runs = study_runs(study, work)
    cfg = common.bench_config(
        "marble", [*s.get("extra_overrides", []), f"eval.images_per_prompt={s['eval_images_per_prompt']}"]
    )
    rewards = [r.name for r in cfg.rewards]
    splits = stored_scores(study, work, runs, rewards)
    source = "stored"
    if splits is None:
        source = "evaluated"
        with pinned_threads(threads):
            splits = evaluated_scores(cfg, work, runs, s["eval_seeds"])
    presets = list(dict.fromkeys(p for p, _, _ in runs))
    seeds_of = {p: [sd for q, sd, _ in runs if q == p] for p in presets}
    texts = {pid: t for sc in splits.values() for pid, t in zip(sc.prompt_ids, sc.prompts, strict=True)}
    value_of = {a: {pid: fn(t) for pid, t in texts.items()} for a, fn in ATTRIBUTES.items()}
    per_prompt: dict[str, dict[str, dict[str, dict[str, float]]]] = {}  # preset -> reward -> split -> ...
    out_presets: dict[str, Any] = {}
    for p in presets:
        per_prompt[p] = {}
        out_presets[p] = {"seeds": seeds_of[p], "rewards": {}}
        for k, name in enumerate(rewards):
            per_prompt[p][name] = {}
            entry: dict[str, Any] = {"splits": {}, "attributes": {}}
            for split in SPLITS:
                sc = splits[split]
                adapters = [sc.runs[(p, sd)][:, k] for sd in seeds_of[p]]
                pp = per_prompt_deltas(sc.prompt_ids, sc.base[:, k], adapters)
                per_prompt[p][name][split] = pp
                entry["splits"][split] = {
                    "prompts": len(pp),
                    "across_prompts": common.t_interval(list(pp.values())),
                    "across_seeds": common.t_interval(per_seed_means(sc.base[:, k], adapters)),
                }
            for a in ATTRIBUTES:
                tables = {split: by_value(per_prompt[p][name][split], value_of[a]) for split in SPLITS}
                observed = entry["splits"]["test"]["across_prompts"]["mean"]
                entry["attributes"][a] = {
                    **tables,
                    "test_predicted_from_train": predicted_from(
                        tables["train"], list(per_prompt[p][name]["test"]), value_of[a]
                    ),
                    "test_observed": observed if entry["splits"]["test"]["prompts"] else None,
                }
            out_presets[p]["rewards"][name] = entry
    paired = []
    for a, b in PAIRS:
        if a not in per_prompt or b not in per_prompt:
            continue
        paired.append(
            {
                "a": a,
                "b": b,
                "rewards": {
                    name: {
                        split: ahead_count(per_prompt[a][name][split], per_prompt[b][name][split])
                        for split in SPLITS
                    }
                    for name in rewards
                },
            }
        )
    return {
        "benchmark": "prompt_level",
        **common.environment(),
        "settings": {
            "study": str(
                study_json.relative_to(common.REPO) if study_json.is_relative_to(common.REPO) else study_json
            ),
            "study_date_utc": study.get("date_utc"),
            "study_commit": study.get("marble", {}).get("commit"),
            "optimizer_steps": s.get("optimizer_steps"),
            "images_per_prompt": s["eval_images_per_prompt"],
            "scores": source,  # "stored": the study's own; "evaluated": its adapters evaluated again
            "presets": presets,
            "prompts": {split: len(set(splits[split].prompt_ids)) for split in SPLITS},
            "images": {split: len(splits[split].prompt_ids) for split in SPLITS},
            "rewards_held_out": [r.name for r in cfg.rewards if r.held_out],
        },
        "presets": out_presets,
        "paired": paired,
        "wall_seconds": time.perf_counter() - t_start,
    }


def plot(result: dict[str, Any], path: Path, preset: str = "marble_step", attribute: str = "shape") -> Path:
    """The specialists' delta per `attribute` value on the training and the held-out prompts (`preset`),
    with the held-out figure observed and predicted from the training prompts' values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preset = preset if preset in result["presets"] else next(iter(result["presets"]))
    rewards = result["presets"][preset]["rewards"]
    total = result["settings"]["prompts"]["test"]
    specialists = [n for n, r in rewards.items() if 0 < r["splits"]["test"]["prompts"] < total]
    fig, axes = plt.subplots(
        1, max(len(specialists), 1), figsize=(5.5 * max(len(specialists), 1), 4), squeeze=False
    )
    for ax, name in zip(axes[0], specialists, strict=False):
        att = rewards[name]["attributes"][attribute]
        values = sorted(set(att["train"]) | set(att["test"]))
        x = np.arange(len(values))
        for i, split in enumerate(("train", "test")):
            m = [att[split].get(v, {}).get("mean", np.nan) for v in values]
            n = [att[split].get(v, {}).get("prompts", 0) for v in values]
            bars = ax.bar(
                x + (i - 0.5) * 0.4, m, 0.4, label=f"{'training' if split == 'train' else 'held-out'} prompts"
            )
            for bar, count in zip(bars, n, strict=True):
                if count:
                    ax.annotate(
                        str(count),
                        (bar.get_x() + bar.get_width() / 2, 0),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
        ax.axhline(0, color="k", lw=0.6)
        obs, pred = att["test_observed"], att["test_predicted_from_train"]
        ax.set_title(
            f"{name}: held-out {obs:+.2f}, predicted from training {pred:+.2f}"
            if obs is not None and pred is not None
            else name,
            fontsize=9,
        )
        ax.set_xticks(x, values)
        ax.set_ylabel("adapter - base (base std units)")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{preset}: delta per {attribute} (numbers: prompts), seeds {result['presets'][preset]['seeds']}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _fmt(d: dict[str, float]) -> str:
    return f"{d['mean']:+.2f} [{d['ci_lo']:+.2f},{d['ci_hi']:+.2f}]"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, default=STUDY_JSON, help="the reward study's JSON")
    ap.add_argument("--work", type=Path, default=common.WORK_DIR, help="the reward study's work directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT_JSON)
    args = ap.parse_args(argv)
    if not args.study.is_file():
        ap.error(f"--study {args.study}: no such file (run python -m bench.reward_balance first)")
    result = run(args.study, args.work, threads=args.threads)
    common.write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print("prompt level: delta vs base (base-std units), 95% t-interval across prompts | across seeds")
    for p, r in result["presets"].items():
        for name, e in r["rewards"].items():
            cells = [
                f"{split} ({e['splits'][split]['prompts']} prompts) {_fmt(e['splits'][split]['across_prompts'])}"
                f" | {_fmt(e['splits'][split]['across_seeds'])}"
                for split in SPLITS
                if e["splits"][split]["prompts"]
            ]
            shape = e["attributes"]["shape"]
            pred = shape["test_predicted_from_train"]
            tail = "" if pred is None else f"; held-out predicted from training shapes {pred:+.2f}"
            print(f"  {p:13s} {name:15s} " + "; ".join(cells) + tail)
    for c in result["paired"]:
        cells = [
            f"{n} {_fmt(v['test'])} ahead {v['test']['ahead']}/{v['test']['prompts']}"
            for n, v in c["rewards"].items()
            if v["test"]["prompts"]
        ]
        print(f"  paired {c['a']} - {c['b']}, held-out, across prompts: " + ", ".join(cells))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
