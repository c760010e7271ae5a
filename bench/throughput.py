"""Throughput of every balancer preset on the tiny world.

One process, one trainer (`Trainer.setup()` on configs/tiny.yaml: model, adapters, rewards, optimizer)
and one epoch of rollouts; the presets differ only by the balancer object swapped into the trainer.
Each measured optimizer step is the trainer's own `optimizer_step` (micro-steps, backward passes,
accelerate accumulation, clip, AdamW, evaluation EMA): nothing of the update is re-implemented here.

Protocol: torch threads pinned; one warm-up step per preset; then `repeats` rounds, each running one
optimizer step of every preset in a rotated interleaved order (A B C ..., B C ... A, ...), every step
starting from the same adapter and optimizer state (restored outside the timed region). Each preset
keeps its own step counter, so the amortised presets go through their refresh schedule as in training.

Reported per preset (medians over the measured steps):
- `step_ms`: optimizer step; for a preset that refreshes every n-th step, also the medians of refresh
  and cached steps and the amortised cost `(refresh + (n-1) cached) / n` (a plain median would hide
  the one-in-n refresh); `speed_vs_weighted_sum` = weighted-sum time / this preset's amortised time
  (the paper's "0.97x": higher is faster), with a 95% paired bootstrap interval over the rounds
  (`speed_vs_weighted_sum_ci95`);
- `micro_step_ms`: one micro-step, from the start of `NFTUpdate.micro_step` to the end of its
  backward (building the micro-batch excluded), split into refresh and plain micro-steps;
- balancer overhead: Gram + QP time inside the update (`time/balance_s`), the QP/EMA/rescale part
  (`Balancer.update`) and the Gram part (the rest), per refresh and amortised per step;
- memory, measured untimed after the timing (CPU torch has no allocator peak counter): the peak of
  live CPU tensor bytes during the first micro-step of a refresh step above those live at its start
  (torch profiler per-op memory accounting, op granularity), and, over the timed steps, the largest
  kernel peak-RSS mark of a step minus the RSS before it (mark reset through /proc/self/clear_refs
  outside the timed region; the allocator reuses pages freed by earlier steps, so this understates
  what a fresh process needs).

Head to head (`--pair-repeats N`): after the rounds of every preset, N more rounds of two presets
alone (`--pair`, by default weighted sum and the balancer configs/tiny.yaml ships), interleaved the
same way, each round about 2 steps long instead of one of every preset: the shipped default's speed
against weighted sum, measured over more rounds than the all-preset study can afford
(`head_to_head`; the per-preset table above does not use these rounds).

Run: `python -m bench.throughput [--repeats N] [--pair-repeats M]` -> bench/results/throughput.json and
throughput.png. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from marble.threads import pinned_threads

log = logging.getLogger(__name__)

OUT_JSON = common.RESULTS / "throughput.json"
OUT_PNG = common.RESULTS / "throughput.png"


# ---------------------------------------------------------------------------------------- probes
class MicroStepProbe:
    """Observes the trainer's micro-steps without changing them: wraps `update.micro_step` (start,
    whether it refreshed) and `accelerator.backward` (end), and each balancer's `update` (QP time)."""

    def __init__(self, trainer: Any):
        self.micro: list[tuple[float, bool]] = []  # (ms, refreshed)
        self.update_ms = 0.0
        self._t0 = 0.0
        self._refresh = False
        upd, acc = trainer.update, trainer.accelerator
        micro_step, backward = upd.micro_step, acc.backward

        def micro_step_probe(mb, step, micro):
            self._t0 = time.perf_counter()
            res = micro_step(mb, step, micro)
            self._refresh = res.balance is not None
            if res.loss is None:  # per_sample without a KL backward on this micro-step: it ends here
                self.micro.append(((time.perf_counter() - self._t0) * 1e3, self._refresh))
            return res

        def backward_probe(loss, **kwargs):
            backward(loss, **kwargs)
            self.micro.append(((time.perf_counter() - self._t0) * 1e3, self._refresh))

        upd.micro_step = micro_step_probe
        acc.backward = backward_probe

    def watch(self, balancer: Any) -> None:
        if not hasattr(balancer, "num_refreshes"):
            return  # weighted_sum / equal / gdpo: the balancer never solves
        for method in (
            "observe",
            "end_step",
            "solve_step",
        ):  # the trainer's refresh calls (solve, EMA, rescale)
            setattr(balancer, method, self._timed(getattr(balancer, method)))

    def _timed(self, fn: Any) -> Any:
        def probe(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.update_ms += (time.perf_counter() - t0) * 1e3
            return out

        return probe

    def reset(self) -> None:
        self.micro, self.update_ms = [], 0.0


@dataclass
class PresetRun:
    """One preset's balancer, epoch plan, step counter and measurements."""

    name: str
    balancer: Any
    plan: Any
    refresh_fraction: float  # share of optimizer steps that refresh the Gram in a long run
    step: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)


def _refresh_fraction(balancer: Any) -> float:
    if balancer.gram_source is None:
        return 0.0
    return 1.0 / balancer.refresh_every


def _one_step(world: common.World, run: PresetRun, probe: MicroStepProbe) -> dict[str, Any]:
    tr = world.trainer
    common.install_balancer(world, run.balancer)
    accum = world.cfg.train.gradient_accumulation_steps
    first = (run.step * accum) % run.plan.num_batches
    tr.step = run.step
    before = getattr(run.balancer, "num_refreshes", 0)
    probe.reset()
    rss0 = _reset_peak_rss()
    ms, metrics = common.timed(lambda: tr.optimizer_step(run.plan, range(first, first + accum)))
    rss_mb = None if rss0 is None else (_proc_status_bytes("VmHWM") - rss0) / 1e6
    run.step += 1
    refreshes = getattr(run.balancer, "num_refreshes", 0) - before
    balance_ms = float(metrics.get("time/balance_s", 0.0)) * 1e3
    return {
        "step": run.step - 1,
        "step_ms": ms,
        "refreshes": refreshes,
        "balance_ms": balance_ms,
        "qp_ms": probe.update_ms,
        "gram_ms": balance_ms - probe.update_ms,
        "micro_ms": [m for m, _ in probe.micro],
        "micro_refresh": [r for _, r in probe.micro],
        "finite": tr.counters["consecutive_skips"] == 0,
        "peak_rss_delta_mb": rss_mb,
    }


# ---------------------------------------------------------------------------------------- memory
def _live_tensor_peak_mb(fn) -> float | None:
    """Peak live CPU tensor memory during `fn()` above what was live at its start (MB).

    From the torch profiler's per-op memory accounting (`profile_memory=True`): each op's allocations
    net of the frees it performed, summed in op start order. Op granularity: a transient peak inside
    one op is not seen (a stack-based memory timeline would see it, but costs minutes per step).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += ev.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak / 1e6


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> int | None:
    """Reset the kernel's peak-RSS mark VmHWM (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) and
    return the current RSS in bytes; None where that is not available."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status_bytes("VmRSS")
    except (OSError, ValueError):
        return None


def _memory(world: common.World, run: PresetRun, probe: MicroStepProbe, state: common.TrainState) -> dict:
    """Peak tensor memory of one preset's refresh micro-step (step 0, micro-step 0: a refresh for
    every Gram preset)."""
    tr = world.trainer
    common.install_balancer(world, run.balancer)
    state.restore()
    # One micro-step (the first of a refresh step: forward, Gram, QP, backward) under the profiler: the
    # rest of a step repeats this micro-step and adds only the accumulated .grad and AdamW's state (the
    # same for every preset), and profiling keeps the bench inside its time budget.
    mb = run.plan.micro_batch(0, 0, tr.text_cache, tr.device)

    def micro_step() -> None:
        res = tr.update.micro_step(mb, 0, 0)
        if res.loss is not None:  # per_sample with λ = 0 forms its gradient without a backward of its own
            res.loss.backward()

    tensor_mb = _live_tensor_peak_mb(micro_step)
    tr.optimizer.zero_grad(set_to_none=True)
    state.restore()
    return {"peak_tensor_mb": tensor_mb}


# ---------------------------------------------------------------------------------------- summary
def amortized_ms(steps: list[dict[str, Any]], refresh_fraction: float) -> float:
    """A preset's step time over its refresh cycle: `f · median(refresh steps) + (1 - f) · median(cached
    steps)` (a plain median when it always or never refreshes, or one kind of step is missing)."""
    all_ms = [s["step_ms"] for s in steps]
    ref = [s["step_ms"] for s in steps if s["refreshes"] > 0]
    cached = [s["step_ms"] for s in steps if s["refreshes"] == 0]
    f = refresh_fraction
    if f >= 1.0 or not cached:
        return common.median(ref or all_ms)
    if f == 0.0 or not ref:
        return common.median(cached)
    return f * common.median(ref) + (1 - f) * common.median(cached)


def speed_interval(
    base: list[dict[str, Any]],
    steps: list[dict[str, Any]],
    f_base: float,
    f: float,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """95% paired bootstrap interval of `amortized(base) / amortized(steps)`: the rounds (index i of
    both lists ran in the same interleaved round) are resampled together, so what the machine did
    during a round moves both. Deterministic for a seed."""
    n = min(len(base), len(steps))
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        ratios.append(amortized_ms([base[i] for i in idx], f_base) / amortized_ms([steps[i] for i in idx], f))
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def summarize(run: PresetRun) -> dict[str, Any]:
    """Medians of one preset's measured steps (see the module docstring)."""
    steps = run.steps
    all_ms = [s["step_ms"] for s in steps]
    ref = [s["step_ms"] for s in steps if s["refreshes"] > 0]
    cached = [s["step_ms"] for s in steps if s["refreshes"] == 0]
    f = run.refresh_fraction
    amortized = amortized_ms(steps, f)
    micro = [m for s in steps for m in s["micro_ms"]]
    micro_ref = [m for s in steps for m, r in zip(s["micro_ms"], s["micro_refresh"], strict=True) if r]
    micro_plain = [m for s in steps for m, r in zip(s["micro_ms"], s["micro_refresh"], strict=True) if not r]
    per_refresh = [s for s in steps if s["refreshes"] > 0]
    gram_per_refresh = [s["gram_ms"] / s["refreshes"] for s in per_refresh]
    qp_per_refresh = [s["qp_ms"] / s["refreshes"] for s in per_refresh]
    refreshes_per_step = max((s["refreshes"] for s in steps), default=0)
    balance_ref = common.median([s["balance_ms"] for s in per_refresh])
    return {
        "steps_measured": len(steps),
        "refresh_fraction": f,
        "refreshes_per_refresh_step": refreshes_per_step,
        "step_ms_median": common.median(all_ms),
        "step_ms_refresh_median": common.median(ref),
        "step_ms_cached_median": common.median(cached),
        "step_ms_amortized": amortized,
        "micro_steps_per_step": len(steps[0]["micro_ms"]) if steps else 0,
        "micro_step_ms_median": common.median(micro),
        "micro_step_ms_refresh_median": common.median(micro_ref),
        "micro_step_ms_plain_median": common.median(micro_plain),
        "balancer_ms_per_refresh_step": balance_ref if per_refresh else 0.0,
        "balancer_ms_amortized_per_step": (f * balance_ref) if per_refresh else 0.0,
        "gram_ms_per_refresh": common.median(gram_per_refresh) if per_refresh else 0.0,
        "qp_ms_per_refresh": common.median(qp_per_refresh) if per_refresh else 0.0,
        "non_finite_steps": sum(not s["finite"] for s in steps),
        "peak_rss_delta_mb": max(
            (s["peak_rss_delta_mb"] for s in steps if s["peak_rss_delta_mb"] is not None), default=None
        ),
    }


# ---------------------------------------------------------------------------------------- run
def run(
    cfg,
    work: Path,
    *,
    presets: list[str],
    repeats: int,
    warmup: int = 1,
    threads: int = 2,
    memory: bool = True,
    time_budget_s: float | None = None,
    pair: tuple[str, str] | None = None,
    pair_repeats: int = 0,
    pair_time_budget_s: float | None = None,
) -> dict[str, Any]:
    """Build the world once and time every preset interleaved; returns the results dict.

    With `time_budget_s`, rounds stop once the study has run that long (at least 2 rounds are kept),
    so a loaded machine shortens the study instead of the whole benchmark overrunning; the same for
    the head-to-head rounds of `pair` with `pair_time_budget_s`."""
    if pair_repeats and (pair is None or any(p not in presets for p in pair)):
        raise ValueError(f"throughput: --pair {pair} must name two of the timed presets {presets}")
    load_start = common.load_average()
    t_start = time.perf_counter()
    with pinned_threads(threads):
        world = common.build_world(cfg, work, "throughput")
        t_budget = time.perf_counter()  # the budget is for measuring: a first model build is not charged
        tr = world.trainer
        probe = MicroStepProbe(tr)
        runs: dict[str, PresetRun] = {}
        for name in presets:
            bal = common.make_balancer(world, name)
            probe.watch(bal)
            buf = common.buffer_for(world, bal)
            from marble.train.stepping import EpochPlan

            plan = EpochPlan(world.cfg, buf, 1, 0, tr.grid)
            runs[name] = PresetRun(name, bal, plan, _refresh_fraction(bal))
        for _ in range(warmup):  # first calls pay allocation, optimizer state creation, caches
            for name in presets:
                _one_step(world, runs[name], probe)
        for r in runs.values():  # the first timed step of an amortised preset is a refresh step (every
            if 0.0 < r.refresh_fraction < 1.0:  # n-th), the next ones cached: both kinds get measured
                r.step = max(r.step, round(1 / r.refresh_fraction))
        state = common.TrainState(tr)
        timed = _interleaved_rounds(world, runs, probe, state, presets, repeats, time_budget_s, t_budget)
        for name, steps in timed.items():
            runs[name].steps.extend(steps)
        rounds_done = len(timed[presets[0]])
        load_timed = common.load_average()
        memory_res: dict[str, dict[str, float | None]] = {}
        t_memory = time.perf_counter()
        if memory:
            for name in presets:
                if time_budget_s is not None and time.perf_counter() - t_budget > time_budget_s + 60:
                    log.warning("throughput: time budget spent; peak tensor memory of %s not measured", name)
                    memory_res[name] = {"peak_tensor_mb": None}
                    continue
                memory_res[name] = _memory(world, runs[name], probe, state)
        memory_seconds = time.perf_counter() - t_memory
        # after the memory readings, whose time budget is the all-preset rounds'
        head_to_head = _head_to_head(world, runs, probe, state, pair, pair_repeats, pair_time_budget_s)
        tr.cleanup()
    summary = {name: summarize(r) for name, r in runs.items()}
    base = summary.get("weighted_sum")
    for name, s in summary.items():
        if base is not None:
            s["speed_vs_weighted_sum"] = base["step_ms_amortized"] / s["step_ms_amortized"]
            s["speed_vs_weighted_sum_ci95"] = speed_interval(
                runs["weighted_sum"].steps, runs[name].steps, base["refresh_fraction"], s["refresh_fraction"]
            )
            s["time_ratio_vs_weighted_sum"] = s["step_ms_amortized"] / base["step_ms_amortized"]
            s["micro_step_time_ratio_vs_weighted_sum"] = (
                s["micro_step_ms_median"] / base["micro_step_ms_median"]
            )
        if memory:
            s.update(memory_res[name])
            if base is not None and memory_res["weighted_sum"]["peak_tensor_mb"]:
                tm = memory_res[name]["peak_tensor_mb"]
                s["peak_tensor_ratio_vs_weighted_sum"] = (
                    None if tm is None else tm / memory_res["weighted_sum"]["peak_tensor_mb"]
                )
    s_cfg = world.cfg
    return {
        "benchmark": "throughput",
        **common.environment(),
        "load_average": {"start": load_start, "after_timing": load_timed, "end": common.load_average()},
        "settings": {
            "config": str(common.TINY_CONFIG.relative_to(common.REPO)),
            "presets": list(presets),
            "repeats": rounds_done,
            "repeats_requested": repeats,
            "time_budget_s": time_budget_s,
            "warmup_steps": warmup,
            "torch_threads": threads,
            "samples_per_epoch": s_cfg.sampling.samples_per_epoch,
            "micro_batch_size": s_cfg.train.micro_batch_size,
            "gradient_accumulation_steps": s_cfg.train.gradient_accumulation_steps,
            "train_timesteps": s_cfg.num_train_timesteps,
            "trainable_params": sum(p.numel() for p in tr.params),
            "rewards_trained": tr.reward_names,
            "memory_method": {
                "peak_tensor_mb": "peak live CPU tensor bytes during the first micro-step of a refresh step "
                "(forward, Gram, QP, backward) above those live at its start (torch profiler per-op memory "
                "accounting, summed in op order; op granularity)",
                "peak_rss_delta_mb": "max over the timed steps of the kernel peak RSS (VmHWM, reset before "
                "each step outside the timed region) minus the RSS before the step (understates: the "
                "allocator reuses pages freed by earlier steps)",
            },
        },
        "wall_seconds": time.perf_counter() - t_start,
        "memory_seconds": memory_seconds,
        "presets": summary,
        "head_to_head": head_to_head,
        "raw_steps": {name: r.steps for name, r in runs.items()},
    }


def _interleaved_rounds(
    world: common.World,
    runs: dict[str, PresetRun],
    probe: MicroStepProbe,
    state: common.TrainState,
    names: list[str],
    repeats: int,
    time_budget_s: float | None,
    t0: float,
) -> dict[str, list[dict[str, Any]]]:
    """Up to `repeats` rounds of one optimizer step of each of `names`, in a rotated order, each from
    the restored state; after the round that passes `time_budget_s` since `t0` (at least 2 rounds),
    no more. Returns each preset's timed steps in round order."""
    steps: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for i in range(repeats):
        for name in common.rotated(list(names), i):
            state.restore()
            steps[name].append(_one_step(world, runs[name], probe))
        log.info("throughput round %d/%d done (%s)", i + 1, repeats, ", ".join(names))
        if time_budget_s is not None and i >= 1 and time.perf_counter() - t0 > time_budget_s:
            log.warning("throughput: time budget reached after %d rounds of %s", i + 1, ", ".join(names))
            break
    return steps


def _head_to_head(
    world: common.World,
    runs: dict[str, PresetRun],
    probe: MicroStepProbe,
    state: common.TrainState,
    pair: tuple[str, str] | None,
    repeats: int,
    time_budget_s: float | None,
) -> dict[str, Any] | None:
    """`repeats` more interleaved rounds of the two presets of `pair` alone (base first): their step
    medians and the speed of the second against the first with its paired bootstrap interval."""
    if not repeats or pair is None:
        return None
    base, other = pair
    t0 = time.perf_counter()
    steps = _interleaved_rounds(world, runs, probe, state, [base, other], repeats, time_budget_s, t0)
    f_base, f = runs[base].refresh_fraction, runs[other].refresh_fraction
    base_ms, other_ms = amortized_ms(steps[base], f_base), amortized_ms(steps[other], f)
    log.info("throughput: %s vs %s, %d rounds: %.3fx", other, base, len(steps[base]), base_ms / other_ms)
    return {
        "presets": [base, other],
        "rounds": len(steps[base]),
        "rounds_requested": repeats,
        "time_budget_s": time_budget_s,
        "step_ms_amortized": {base: base_ms, other: other_ms},
        "speed": base_ms / other_ms,
        "speed_ci95": speed_interval(steps[base], steps[other], f_base, f),
        "seconds": time.perf_counter() - t0,
        "raw_step_ms": {name: [s["step_ms"] for s in v] for name, v in steps.items()},
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    """Amortised step time per preset (balancer share hatched) and micro-step medians."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["presets"])
    s = result["presets"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    step = [s[n]["step_ms_amortized"] for n in names]
    bal = [s[n]["balancer_ms_amortized_per_step"] for n in names]
    rest = [a - b for a, b in zip(step, bal, strict=True)]
    axes[0].bar(names, rest, color="#4c72b0", label="rest of the step")
    axes[0].bar(names, bal, bottom=rest, color="#dd8452", hatch="//", label="Gram + QP (amortised)")
    for i, n in enumerate(names):
        ratio = s[n].get("speed_vs_weighted_sum")
        if ratio is not None:
            axes[0].text(i, step[i], f"{ratio:.2f}x", ha="center", va="bottom", fontsize=8)
    axes[0].set_ylabel("ms per optimizer step (amortised median)")
    axes[0].set_title("optimizer step (label: speed vs weighted_sum)")
    axes[0].legend(fontsize=8)
    plain = [s[n]["micro_step_ms_plain_median"] for n in names]
    refr = [s[n]["micro_step_ms_refresh_median"] for n in names]
    x = range(len(names))
    axes[1].bar([i - 0.2 for i in x], plain, width=0.4, label="plain micro-step")
    axes[1].bar(
        [i + 0.2 for i in x], [0 if v is None else v for v in refr], width=0.4, label="refresh micro-step"
    )
    axes[1].set_xticks(list(x), names)
    axes[1].set_ylabel("ms (median)")
    axes[1].set_title("micro-step (forward + Gram if due + backward)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    m = result["machine"]
    fig.suptitle(
        f"tiny world, {m['cpu_model']}, {m['nproc']} cores, {result['settings']['torch_threads']} torch threads, "
        f"load {result['load_average']['start']}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--repeats", type=int, default=20, help="interleaved rounds (multiple of 10 covers marble's cycle)"
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--presets", nargs="+", default=list(common.PRESETS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument(
        "--time-budget", type=float, help="stop timing rounds after this many seconds (>= 2 rounds)"
    )
    ap.add_argument(
        "--pair-repeats",
        type=int,
        default=0,
        help="head-to-head rounds of the --pair presets after the others",
    )
    ap.add_argument(
        "--pair", nargs=2, metavar=("BASE", "PRESET"),
        help="the head-to-head presets (default: weighted_sum and configs/tiny.yaml's balancer.kind)",
    )  # fmt: skip
    ap.add_argument("--pair-time-budget", type=float, help="stop the head-to-head rounds after this many s")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    ap.add_argument("--work", type=Path, default=common.WORK_DIR)
    ap.add_argument("--out", type=Path, default=OUT_JSON)
    args = ap.parse_args(argv)
    cfg = common.bench_config("marble", args.overrides)
    pair = tuple(args.pair) if args.pair else ("weighted_sum", common.shipped_balancer())
    result = run(
        cfg, args.work, presets=args.presets, repeats=args.repeats, warmup=args.warmup,
        threads=args.threads, memory=not args.no_memory, time_budget_s=args.time_budget,
        pair=pair, pair_repeats=args.pair_repeats, pair_time_budget_s=args.pair_time_budget,
    )  # fmt: skip
    result["settings"]["overrides"] = args.overrides
    common.write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(
        f"throughput, tiny world ({result['settings']['torch_threads']} threads; load {result['load_average']})"
    )
    print(
        f"  {'preset':13s} {'step ms':>9s} {'speed':>7s} {'micro ms':>9s} {'Gram+QP/step':>13s} {'tensor MB':>10s}"
    )
    for name, s in result["presets"].items():
        tm = s.get("peak_tensor_mb")
        print(
            f"  {name:13s} {s['step_ms_amortized']:9.1f} {s.get('speed_vs_weighted_sum', float('nan')):6.2f}x "
            f"{s['micro_step_ms_median']:9.2f} {s['balancer_ms_amortized_per_step']:13.1f} "
            f"{'-' if tm is None else f'{tm:10.1f}'}"
        )
    h2h = result["head_to_head"]
    if h2h:
        base, other = h2h["presets"]
        lo, hi = h2h["speed_ci95"]
        print(
            f"  head to head, {h2h['rounds']} rounds: {other} {h2h['speed']:.3f}x {base} [{lo:.3f}, {hi:.3f}] "
            f"({h2h['step_ms_amortized'][other]:.1f} vs {h2h['step_ms_amortized'][base]:.1f} ms)"
        )
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
