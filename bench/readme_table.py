"""Render the README's benchmark section from bench/results/*.json (no number is typed by hand).

`python -m bench.readme_table` prints the markdown; `--write README.md` replaces what lies between
`<!-- bench:start -->` and `<!-- bench:end -->` (the markers are appended at the end if missing;
nothing outside them is touched).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from bench import common
from bench.reward_balance import seed_note

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _f(x: Any, fmt: str = ".2f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:{fmt}}{suffix}"


def _ci(d: dict[str, Any] | None, fmt: str = "+.2f") -> str:
    if not d or d.get("mean") is None:
        return "-"
    if d.get("ci_lo") is None or d.get("ci_hi") is None:
        return _f(d["mean"], fmt)
    return f"{d['mean']:{fmt}} [{d['ci_lo']:{fmt}}, {d['ci_hi']:{fmt}}]"


def _env_line(res: dict[str, Any]) -> str:
    m, v, g = res["machine"], res["versions"], res["marble"]
    commit = (g.get("commit") or "unknown")[:10] + (" (dirty tree)" if g.get("dirty") else "")
    load = res.get("load_average", {})
    loads = ", ".join(f"{k} {v}" for k, v in load.items()) if isinstance(load, dict) else str(load)
    return (
        f"{res['date_utc']}, {m['cpu_model']}, {m['nproc']} cores, torch {v['torch']}, diffusers "
        f"{v['diffusers']}, marble {commit}; load average (1/5/15 min) {loads}"
    )


def _fastest_micro(steps: list[dict[str, Any]]) -> str:
    """Minimum micro-step time, plain and refresh, from the raw steps: on a loaded machine the
    minimum is the least disturbed measurement (interference only ever adds time)."""
    plain = [m for s in steps for m, r in zip(s["micro_ms"], s["micro_refresh"], strict=True) if not r]
    ref = [m for s in steps for m, r in zip(s["micro_ms"], s["micro_refresh"], strict=True) if r]
    return f"{_f(min(plain) if plain else None, '.0f')} / {_f(min(ref) if ref else None, '.0f')}"


def _fractions(d: dict[str, Any], all_key: str, later_key: str) -> str:
    """'48%' (a preset without a Gram), '20% / 3%' (cached), '20% / n/a' (every one feeds a refresh)."""
    frac = _f(d.get(all_key, {}).get("frac_min_negative"), ".0%")
    lt = d.get(later_key)
    if lt is not None:
        frac += f" / {_f(lt.get('frac_min_negative'), '.0%')}" if lt.get("batches") else " / n/a"
    return frac


def micro_batch_table(alis: dict[int, dict[str, Any]]) -> list[str]:
    """min cos < 0 per micro-batch and per optimizer step at each micro-batch size measured."""
    sizes = sorted(alis)
    head = ["preset"]
    for mb in sizes:
        st = alis[mb]["settings"]
        head += [
            f"micro-batch {mb} x {st['gradient_accumulation_steps']}: per micro-batch",
            f"micro-batch {mb}: per step",
        ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in [*common.PRESETS, *FRESH_LABELS]:
        row = [f"`{p}`" if p in common.PRESETS else FRESH_LABELS[p]]
        for mb in sizes:
            d = alis[mb]["directions"].get(p, {})
            row += [_fractions(d, "all_batches", "later_batches"), _fractions(d, "all_steps", "later_steps")]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _speed(thr: dict[str, Any], preset: str) -> str:
    """'0.92x [0.84, 0.96]': the amortised speed ratio and the 95% paired bootstrap interval over the
    interleaved rounds that `bench.throughput` computed (`speed_vs_weighted_sum_ci95`)."""
    s = thr["presets"].get(preset, {})
    point = _f(s.get("speed_vs_weighted_sum"), ".2f", "x")
    interval = s.get("speed_vs_weighted_sum_ci95")
    if preset == "weighted_sum" or interval is None:
        return point
    lo, hi = interval
    return f"{point} [{lo:.2f}, {hi:.2f}]"


FRESH_LABELS = {
    "fresh_mgda": "fresh MGDA on the exact Gram of the micro-batch (of the step)",
    "fresh_output": "fresh MGDA per micro-batch on its output-space Gram",
    "fresh_last_layer": "fresh MGDA per micro-batch on its last-layer Gram",
    "fresh_last_block": "fresh MGDA per micro-batch on its last-block Gram",
    "fresh_per_sample": "fresh MGDA per micro-batch on its per-sample Gram (exact, one backward)",
}
CHEAPER_GRAMS = {
    "output": "output-space",
    "last_layer": "last-layer",
    "last_block": "last-block",
    "per_sample": "per-sample (exact, from the update's own backward; ms added to the plain backward it replaces, negative: saved)",
}


def cheaper_gram_line(ali: dict[str, Any], thr: dict[str, Any] | None) -> str:
    """How well a fresh solve on each batch does with each Gram source, and what each Gram costs."""
    d, ms = ali["directions"], ali["gram_sources"].get("gram_ms_median")
    if not ms or any(f"fresh_{src}" not in d or src not in ms for src in CHEAPER_GRAMS):
        return ""
    cells = [
        f"{label} Gram {_f(d[f'fresh_{src}']['all_batches']['frac_min_negative'], '.0%')} ({_f(ms[src], '.1f')} ms)"
        for src, label in CHEAPER_GRAMS.items()
    ]
    micro = thr["presets"]["weighted_sum"]["micro_step_ms_median"] if thr else None
    return (
        "Cheaper Grams (`bench/alignment.py`, `ProxyGrams`): solved fresh on the micro-batch they are applied "
        f"to, min cos < 0 with the exact Gram {_f(d['fresh_mgda']['all_batches']['frac_min_negative'], '.0%')}"
        f" ({_f(ms['params'], '.1f')} ms per micro-batch for its K backward passes), then "
        + ", ".join(cells)
        + (f"; a weighted-sum micro-step takes {_f(micro, '.1f')} ms." if micro is not None else ".")
    )


def world_line(rb: dict[str, Any]) -> str:
    """The conditioning accuracy of the tiny world, as measured by the reward study."""
    c = rb.get("conditioning")
    if not c:
        return "World: conditioning accuracy not measured in this run."
    return (
        f"World: how well the base tiny model follows its prompts: nearest-colour accuracy {_f(c['color'], '.0%')} "
        f"(chance {_f(c['color_chance'], '.1%')}) on {c['images']} images and position accuracy "
        f"{_f(c['position'], '.0%')} (chance {_f(c['position_chance'], '.0%')}) on {c['positional_images']}, "
        "colour x shape pairs held out from its pretraining, sampled as training samples "
        "(`marble conditioning`, `marble/eval/conditioning.py`)." + _ceiling(c.get("vae_round_trip"))
    )


def _ceiling(v: dict[str, float] | None) -> str:
    if not v:
        return ""
    return (
        f" Its VAE's ceiling (the renderer's own images of those prompts, encoded and decoded): colour "
        f"{_f(v['color'], '.0%')}, position {_f(v['position'], '.0%')}."
    )


def paired_lines(rb: dict[str, Any]) -> list[str]:
    held = set(rb["settings"]["rewards_held_out"])
    out = []
    for c in rb.get("paired", []):
        cells = [
            f"{n}{' (held out)' if n in held else ''} {_ci(c['rewards'][n]['diff'])}" for n in c["rewards"]
        ]
        better, worse = c["a_better_trained_ci"], c["a_worse_trained_ci"]
        verdict = (
            f"`{c['a']}` ahead with the interval above zero on {', '.join(better) or 'no trained reward'}; "
            f"behind with the interval below zero on {', '.join(worse) or 'none'}"
        )
        out.append(
            f"- `{c['a']}` - `{c['b']}`, paired on seeds {c['seeds']} (per-seed difference of the deltas, "
            f"base-std units, mean [95% t-interval]): {'; '.join(cells)}. {verdict}."
        )
    return out


def main_table(thr: dict | None, ali: dict | None, rb: dict | None) -> list[str]:
    presets = list(common.PRESETS)
    head = ["preset"]
    if thr:
        head += [
            "step ms (amortised)",
            "speed vs weighted_sum",
            "micro-step ms (median)",
            "fastest micro-step ms (plain / refresh)",
            "Gram+QP ms/step",
            "peak tensor MB",
        ]
    if ali:
        head += [
            "min cos < 0 per micro-batch (all / not refreshed on)",
            "min cos < 0 per optimizer step (all / not refreshed on)",
            "worst min cos",
            "cos variance",
        ]
    if rb:
        head += ["trained rewards improved (mean / CI)", "mean Δ trained (std units)", "worst Δ trained"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in presets:
        row = [f"`{p}`"]
        if thr:
            s = thr["presets"].get(p, {})
            row += [
                _f(s.get("step_ms_amortized"), ".0f"),
                _speed(thr, p),
                _f(s.get("micro_step_ms_median"), ".1f"),
                _fastest_micro(thr["raw_steps"].get(p, [])),
                _f(s.get("balancer_ms_amortized_per_step"), ".1f"),
                _f(s.get("peak_tensor_mb"), ".1f"),
            ]
        if ali:
            d = ali["directions"].get(p, {})
            a = d.get("all_batches", {})
            row += [
                _fractions(d, "all_batches", "later_batches"),
                _fractions(d, "all_steps", "later_steps"),
                _f(a.get("worst_min_cos"), "+.3f"),
                _f(a.get("mean_var_cos"), ".4f"),
            ]
        if rb:
            s = rb["presets"].get(p)
            if s is None:
                row += ["-", "-", "-"]
            else:
                k = len(rb["settings"]["rewards_trained"])
                row += [
                    f"{len(s['improved_trained_mean'])}/{k} / {len(s['improved_trained_ci'])}/{k}",
                    _f(s.get("mean_delta_std_units_trained"), "+.2f"),
                    _f(s.get("worst_delta_std_units_trained"), "+.2f"),
                ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def reward_table(rb: dict[str, Any]) -> list[str]:
    names = list(next(iter(rb["presets"].values()))["rewards"])
    held = set(rb["settings"]["rewards_held_out"])
    head = ["preset", "seeds", *[f"{n} (held out)" if n in held else n for n in names], "all trained > 0"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p, s in rb["presets"].items():
        cells = [_ci(s["rewards"][n]["delta_std_units"]) for n in names]
        flag = "yes" if s["improves_all_mean"] else "no"
        flag += " (CI: yes)" if s["improves_all_ci"] else " (CI: no)"
        lines.append("| " + " | ".join([f"`{p}`", str(len(s["seeds"])), *cells, flag]) + " |")
    return lines


def rollouts_table(rvb: dict[str, Any]) -> list[str]:
    """Training rewards minus the base run's on the same rollouts, over the last third of the steps."""
    presets = rvb["presets"]
    names = list(next(iter(presets.values()))["rewards"])
    steps = next(iter(presets.values()))["rewards"][names[0]]["last"]["steps"]
    lines = [
        f"Training rollouts of steps {steps[0]}-{steps[1]}, preset - base on the same prompts and noise "
        "(reward units, mean over seeds [95% t-interval]; the base run trains at lr 1e-12: "
        "`bench/rollouts_vs_base.py`):",
        "",
        "| preset | seeds | " + " | ".join(names) + " |",
        "|" + "---|" * (len(names) + 2),
    ]
    for p, r in presets.items():
        cells = [_ci(r["rewards"][n]["last"], "+.3f") for n in names]
        lines.append("| " + " | ".join([f"`{p}`", str(len(r["seeds"])), *cells]) + " |")
    return lines


def prompt_level_table(pl: dict[str, Any]) -> list[str]:
    """The specialists (rewards that score only some prompts) per core preset: held-out and training
    deltas with intervals across prompts and across seeds, and the held-out delta predicted from the
    training prompts of each held-out prompt's shape (`bench/prompt_level.py`)."""
    total = pl["settings"]["prompts"]["test"]
    presets = pl["presets"]
    first = next(iter(presets.values()))["rewards"]
    specialists = [n for n, r in first.items() if 0 < r["splits"]["test"]["prompts"] < total]
    if not specialists:
        return []
    lines = [
        "The specialists per prompt (`bench/prompt_level.py`, the same adapters and images; adapter - base in "
        "base-std units, mean [95% t-interval across prompts] and [across seeds]; shape mix: the held-out "
        "figure if each held-out prompt moved as the training prompts of its shape did):",
        "",
        "| preset | reward | held-out prompts | held-out, across prompts | across seeds | shape mix | "
        "training prompts | training, across prompts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p, r in presets.items():
        for n in specialists:
            e = r["rewards"][n]
            test, train = e["splits"]["test"], e["splits"]["train"]
            lines.append(
                "| "
                + " | ".join(
                    [
                        f"`{p}`",
                        f"`{n}`",
                        str(test["prompts"]),
                        _ci(test["across_prompts"]),
                        _ci(test["across_seeds"]),
                        _f(e["attributes"]["shape"]["test_predicted_from_train"], "+.2f"),
                        str(train["prompts"]),
                        _ci(train["across_prompts"]),
                    ]
                )  # fmt: skip
                + " |"
            )
    return lines


LONG_STUDY, LONG_PROMPT_LEVEL = "reward_balance_long", "prompt_level_long"
"""The reward study run longer than `make bench`'s budget allows, as a separate command
(`python -m bench.reward_balance --epochs N --out bench/results/reward_balance_long.json`, and its
prompt-level reading with `--out bench/results/prompt_level_long.json`): rendered under its own
heading, after `make bench`'s own study."""


def reward_study_note(rb: dict[str, Any]) -> str:
    """What a reward study's tables rest on: steps, seeds, evaluation images."""
    st = rb["settings"]
    return (
        f"Rewards: {st['optimizer_steps']} optimizer steps per run, seeds {seed_note(st, markdown=True)}, "
        f"{st['eval_images']} held-out images ({st['eval_prompts']} prompts x {st['eval_images_per_prompt']}"
        f" seeds, {st['eval_num_steps']} Euler steps, {st['eval_weights']} weights); Δ = adapter - base in "
        "base-std units, mean over seeds [95% t-interval across seeds]."
    )


def reward_study_lines(rb: dict[str, Any], pl: dict[str, Any] | None) -> list[str]:
    """A reward study's tables: held-out deltas, paired comparisons, the training split, the rollouts
    against a base run, and the prompt-level reading `pl` when it read this very study (same date)."""
    out = ["Per-reward change on held-out prompts (adapter - base, base-std units):", ""]
    out += [*reward_table(rb), ""]
    out += ["Paired comparisons (same seeds, same evaluation images):", "", *paired_lines(rb), ""]
    if (ts := rb.get("train_split")) and ts.get("presets"):
        out += [
            f"The same evaluation on the training prompts ({ts['prompts']} prompts, {ts['images']} images;"
            " adapter - base, base-std units): a gap to the table above is one between the splits, not"
            " what training did to the rewards:",
            "",
            *reward_table({"presets": ts["presets"], "settings": rb["settings"]}),
            "",
        ]
    if rb.get("rollouts_vs_base", {}).get("presets"):
        out += [*rollouts_table(rb["rollouts_vs_base"]), ""]
    if pl is not None and pl["settings"].get("study_date_utc") == rb.get("date_utc") and (table := prompt_level_table(pl)):  # fmt: skip
        out += [*table, ""]
    return out


def long_study_lines(rb: dict[str, Any], pl: dict[str, Any] | None) -> list[str]:
    """The longer reward study (`LONG_STUDY`) under its own heading, with the command that reproduces it
    (from its recorded settings) and its run's environment."""
    st = rb["settings"]
    steps = st["optimizer_steps"]
    args = [f"--epochs {steps}", "--seeds " + " ".join(map(str, st["seeds"]))]
    if st.get("other_seeds") and st["other_seeds"] != st["seeds"]:
        args.append("--other-seeds " + " ".join(map(str, st["other_seeds"])))
    args += [f"--images-per-prompt {st['eval_images_per_prompt']}", f"--out bench/results/{LONG_STUDY}.json"]
    return [
        f"### The reward study at {steps} optimizer steps (a separate run)",
        "",
        f"The same study as above run for {steps} optimizer steps per run, longer than `make bench`'s budget"
        f" allows (`python -m bench.reward_balance {' '.join(args)}`;"
        f" its prompt-level reading `bench/results/{LONG_PROMPT_LEVEL}.json`): {_env_line(rb)}.",
        "",
        reward_study_note(rb),
        "",
        *reward_study_lines(rb, pl),
    ]


def render(results: Path = common.RESULTS) -> str:
    thr, ali, rb = (_load(results, n) for n in ("throughput", "alignment", "reward_balance"))
    alis = {mb: res for mb in (8, 64) if (res := _load(results, f"alignment_mb{mb}"))}
    if ali and alis:
        alis[ali["settings"]["micro_batch_size"]] = ali
    run_all = _load(results, "run_all")
    out = [
        "## Benchmarks (tiny world, CPU)",
        "",
        "Generated by `python -m bench.readme_table` from `bench/results/*.json` (written by `make bench`);"
        " method, caveats and a reading of the numbers: [bench/README.md](bench/README.md).",
        "",
    ]
    if not (thr or ali or rb):
        return "\n".join([*out, "No results yet: run `make bench`.", ""])
    for name, res in (("throughput", thr), ("alignment", ali), ("reward balance", rb)):
        if res:
            out.append(f"- {name}: {_env_line(res)}")
    for mb in (8, 64):
        if (res := _load(results, f"alignment_mb{mb}")) is not None:
            out.append(f"- alignment, micro-batch {mb}: {_env_line(res)}")
    if run_all:
        out.append(
            f"- whole `make bench` run: {_f(run_all.get('wall_seconds', 0) / 60, '.1f')} min "
            f"(studies: {', '.join(f'{k} {v / 60:.1f} min' for k, v in run_all.get('study_seconds', {}).items())})"
        )
    if rb:
        out += ["", world_line(rb)]
    out += ["", *main_table(thr, ali, rb), ""]
    notes = []
    if thr:
        st = thr["settings"]
        notes.append(
            f"Step time: median over {st['repeats']} interleaved rounds, amortised over the refresh cycle "
            "(speed: [95% paired bootstrap interval over the rounds]), "
            f"{st['torch_threads']} torch threads; {st['micro_batch_size'] * st['gradient_accumulation_steps']}"
            f" samples x {st['train_timesteps']} timesteps per optimizer step. Peak tensor MB: live CPU tensor"
            " bytes during the first micro-step of a refresh step above those at its start (torch profiler)."
        )
        if h2h := thr.get("head_to_head"):
            base, other = h2h["presets"]
            lo, hi = h2h["speed_ci95"]
            ms = h2h["step_ms_amortized"]
            notes.append(
                f"Head to head: `{other}` (the shipped default) against `{base}` alone, {h2h['rounds']} more"
                f" interleaved rounds of the two after the table's: **{h2h['speed']:.2f}x [{lo:.2f}, {hi:.2f}]**"
                f" ({ms[other]:.0f} ms against {ms[base]:.0f} ms a step; `bench.throughput --pair-repeats`)."
            )
    if ali:
        st, g = ali["settings"], ali["gram_sources"]
        notes.append(
            f"Cosines: {ali['directions']['marble']['all_batches']['batches']} micro-batches "
            f"({st['micro_batch_size']} samples at one timestep slot) and "
            f"{ali['directions']['marble']['all_steps']['batches']} optimizer steps (the per-reward gradients "
            f"and the applied direction summed over a step's micro-batches) of {st['epochs']} training epochs "
            f"(driven by `{st['driver']}`). 'Not refreshed on': without the micro-batches (steps) whose Gram "
            "the preset observed before applying its α; n/a: every one of them feeds its refresh (`marble` "
            "sums every micro-step's output-space Gram into its step's solve), so its 'all' figure is the one"
            " that applies. Fresh MGDA direction: min cos < 0 on "
            f"{_f(ali['directions']['fresh_mgda']['all_batches']['frac_min_negative'], '.0%')} of micro-batches"
            f" and {_f(ali['directions']['fresh_mgda']['all_steps']['frac_min_negative'], '.0%')} of steps. "
            f"Output-space vs parameter-space Gram: median L1 distance between their α "
            f"{_f(g['alpha_l1_median'], '.3f')} (max {_f(g['alpha_l1_max'], '.3f')}), same top reward on "
            f"{_f(g['argmax_agree_frac'], '.0%')} of batches, median cosine of the two directions "
            f"{_f(g['direction_cos_median'], '.3f')}."
        )
        if line := cheaper_gram_line(ali, thr):
            notes.append(line)
    if rb:
        notes.append(reward_study_note(rb))
    for n in notes:
        out += [n, ""]
    if rb:
        out += ["", *reward_study_lines(rb, _load(results, "prompt_level"))]
    if len(alis) > 1:
        sizes = sorted(alis)
        out += [
            "",
            f"Micro-batch size (the same alignment comparison at micro-batches of {', '.join(map(str, sizes))} "
            "samples; fraction with min cos < 0, all / not refreshed on; the per-step figure of a fresh "
            "solve per micro-batch is that of the sum of its directions over the step):",
            "",
            *micro_batch_table(alis),
            "",
        ]
    if long_rb := _load(results, LONG_STUDY):
        out += ["", *long_study_lines(long_rb, _load(results, LONG_PROMPT_LEVEL))]
    return "\n".join(out).rstrip() + "\n"


def update_readme(readme: Path, text: str) -> None:
    """Replace the marked section (append the markers at the end when missing)."""
    from marble.io import atomic_write_text

    body = readme.read_text() if readme.is_file() else ""
    block = f"{START}\n{text.rstrip()}\n{END}"
    if START in body and END in body and body.index(START) < body.index(END):
        pre, rest = body.split(START, 1)
        _, post = rest.split(END, 1)
        new = pre + block + post
    else:
        new = body.rstrip("\n") + ("\n\n" if body else "") + block + "\n"
    atomic_write_text(readme, new)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=common.RESULTS)
    ap.add_argument("--write", type=Path, help="README to update between the bench markers")
    args = ap.parse_args(argv)
    text = render(args.results)
    if args.write:
        update_readme(args.write, text)
        print(f"updated {args.write}")
    else:
        print(text, end="")
    return text


if __name__ == "__main__":
    main()
