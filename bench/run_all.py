"""`make bench`: every benchmark study on the tiny world, then the README table.

Studies, in this order (each writes bench/results/<name>.json and .png), after the tiny model is
built (or found in its cache):
1. `balancer_overhead` (the balancer's own micro-benchmark, its own defaults);
2. `alignment` (gradient cosines of every preset on the same batches), then `alignment_mb8` and
   `alignment_mb64` (the same at micro-batches of 8 and 64 samples);
3. `throughput` (interleaved step timing of every preset, one process, nothing else running; then
   the shipped default against weighted sum alone, over more rounds);
4. `reward_balance` (every preset trained with `marble train` on several seeds, evaluated on held-out
   prompts; the base model's conditioning accuracy);
5. `prompt_level` (the reward study's figures per prompt, from the per-image scores it stored).
Then `bench/results/run_all.json` (wall time per study, the load average, the scale settings) and the
section between the bench markers of README.md and bench/README.md (`bench.readme_table`).

The scale below is what fits the 30-minute budget of `make bench` on the 2-core development machine
(measured; see bench/README.md). `--quick` is a smoke run of the same code (minutes, not for reading).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from bench import common

log = logging.getLogger(__name__)

# Scale of the committed run (see bench/README.md for the timing that chose it).
# reward_balance trains a pilot (one run per worker) for `epochs` epochs, then every run to the largest
# epoch count <= `max_epochs` that its measured cost fits in what is left of BUDGET_S for the whole run;
# the core presets (marble, weighted_sum, gdpo) on `seeds`, the others on `other_seeds`.
# throughput and alignment stop early (recorded) when their own time budget runs out on a loaded machine.
BUDGET_S = 26 * 60
# The micro-batch experiment (`alignment_mb8`, `alignment_mb64`): 64 samples per optimizer step (8
# prompts x 8) split into micro-batches of 8 (a rank's in configs/sd35m-marble.yaml) or taken as one
# micro-batch of 64 (the all-reduced global micro-batch of 8 GPUs x 8).
MICRO_BATCH_STEP = ["sampling.prompts_per_epoch=8", "sampling.batch_size=64"]
MICRO_BATCHES = (8, 64)
FULL = {
    "throughput": {"repeats": 10, "time_budget_s": 200, "pair_repeats": 80, "pair_time_budget_s": 260},
    "alignment": {"epochs": 20, "time_budget_s": 180},
    "alignment_micro_batch": {"epochs": 10, "time_budget_s": 100},
    "reward_balance": {
        "epochs": 2, "max_epochs": 40, "seeds": [0, 1, 2, 3, 4], "other_seeds": [0, 1], "images_per_prompt": 8,
    },
}  # fmt: skip
QUICK = {
    "throughput": {"repeats": 2, "time_budget_s": 60, "pair_repeats": 2, "pair_time_budget_s": 30},
    "alignment": {"epochs": 1, "time_budget_s": 60},
    "alignment_micro_batch": {"epochs": 1, "time_budget_s": 60},
    "reward_balance": {
        "epochs": 1, "max_epochs": 1, "seeds": [0, 1], "other_seeds": [0], "images_per_prompt": 1,
    },
}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke scale (results are not meaningful)")
    ap.add_argument("--skip", nargs="*", default=[], help="studies to skip")
    ap.add_argument("--readme", type=Path, default=common.REPO / "README.md")
    ap.add_argument(
        "--results", type=Path, default=None, help="results dir (default bench/results; --quick: a temp dir)"
    )
    args = ap.parse_args(argv)
    results = args.results or (
        common.REPO / "outputs" / "bench" / "quick-results" if args.quick else common.RESULTS
    )
    results.mkdir(parents=True, exist_ok=True)

    def out(name: str) -> list[str]:
        return ["--out", str(results / f"{name}.json")]

    scale = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    load_start = common.load_average()
    seconds: dict[str, float] = {}

    def study(name: str, fn) -> None:
        if name in args.skip:
            return
        log.info("=== %s ===", name)
        t = time.perf_counter()
        fn()
        seconds[name] = time.perf_counter() - t
        log.info("=== %s done in %.1f s ===", name, seconds[name])

    from bench import alignment, balancer_overhead, prompt_level, reward_balance, throughput
    from marble.models.tiny import ensure_tiny_model

    # the tiny model first (a fresh clone builds it here), so no study's own time budget pays for it
    study("tiny_model", lambda: ensure_tiny_model(common.bench_config().model))
    study("balancer_overhead", lambda: balancer_overhead.main(out("balancer_overhead")))
    study(
        "alignment",
        lambda: alignment.main(
            [
                "--epochs",
                str(scale["alignment"]["epochs"]),
                "--time-budget",
                str(scale["alignment"]["time_budget_s"]),
                *out("alignment"),
            ]
        ),  # fmt: skip
    )
    amb = scale["alignment_micro_batch"]
    for mb in MICRO_BATCHES:
        study(
            f"alignment_mb{mb}",
            lambda mb=mb: alignment.main(
                ["--epochs", str(amb["epochs"]), "--time-budget", str(amb["time_budget_s"]),
                 "--micro-batch", str(mb), *(a for o in MICRO_BATCH_STEP for a in ("--set", o)),
                 *out(f"alignment_mb{mb}")]
            ),
        )  # fmt: skip
    thr = scale["throughput"]
    study(
        "throughput",
        lambda: throughput.main(
            [
                "--repeats",
                str(thr["repeats"]),
                "--time-budget",
                str(thr["time_budget_s"]),
                "--pair-repeats",
                str(thr["pair_repeats"]),
                "--pair-time-budget",
                str(thr["pair_time_budget_s"]),
                *out("throughput"),
            ]
        ),
    )
    rb = scale["reward_balance"]
    study(
        "reward_balance",
        lambda: reward_balance.main(
            ["--epochs", str(rb["epochs"]), "--max-epochs", str(rb["max_epochs"]),
             "--budget", str(BUDGET_S - (time.perf_counter() - t0)), "--seeds", *map(str, rb["seeds"]),
             "--other-seeds", *map(str, rb["other_seeds"]),
             "--images-per-prompt", str(rb["images_per_prompt"]), *out("reward_balance")]
        ),
    )  # fmt: skip
    study(
        "prompt_level",
        lambda: prompt_level.main(["--study", str(results / "reward_balance.json"), *out("prompt_level")]),
    )
    result = {
        "benchmark": "run_all",
        **common.environment(),
        "quick": args.quick,
        "scale": scale,
        "budget_s": BUDGET_S,
        "load_average": {"start": load_start, "end": common.load_average()},
        "study_seconds": seconds,
        "wall_seconds": time.perf_counter() - t0,
    }
    common.write_json(results / "run_all.json", result)
    from bench import readme_table

    if results == common.RESULTS:
        readme_table.main(["--write", str(args.readme)])
        readme_table.main(["--write", str(Path(__file__).parent / "README.md")])
    else:  # a smoke run never touches the README
        readme_table.main(["--results", str(results)])
    print(
        f"make bench: {result['wall_seconds'] / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})"
    )
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
