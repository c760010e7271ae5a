"""Replay balancer configurations on the Grams saved by an alignment run (`alignment --save-grams`).

The alignment study measures each preset once, along one trajectory. Choosing a balancer's settings
(Gram source, refresh schedule, EMA ρ, γ bound) needs many configurations on the SAME batches; each
costs nothing once the Grams are saved: per optimizer step, the block Gram of every micro-step's
per-reward parameter gradients (`[M·K, M·K]`, micro-step-major), and each micro-step's output-space
Gram `[K, K]`. The replay drives marble's own balancer objects through the trainer's protocol
(`needs_gram` / `observe` / `batch_gamma` / `end_step`, as `NFTUpdate.micro_step` does) and computes,
from the Grams alone (`diagnostics.gram_cosines`), the cosines of each applied direction with every
reward's gradient: per micro-batch (one micro-batch at one timestep slot) and per optimizer step (the
gradients and directions summed over the step's micro-steps). Exact, not a simulation: the applied
direction of micro-step m is `Σ_k γ_k g_k(m)`, so every inner product is a Gram entry.

Run: `python -m bench.alignment_replay GRAMS.npz [GRAMS.npz ...] [--config JSON ...]`; without
`--config`, every preset and the candidate table below.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The ablation from the paper's schedule to marble's default (docs/algorithm.md §4.6), then sweeps of
# the default's settings for both Gram sources (refresh interval, observed micro-steps, EMA ρ, γ bound).
_PARAMS = {
    "kind": "marble",
    "gram_source": "params",
    "refresh_every": 10,
    "refresh_micro_steps": "first_slot",
}
CANDIDATES: list[dict[str, Any]] = [
    {"kind": "marble_paper", "refresh": "step", "refresh_micro_steps": "first_slot"},  # + summed refresh
    {"kind": "marble_paper", "normalize": "batch"},  # + the batch's own norms
    {**_PARAMS, "ema_decay": 0.7, "gamma_cap": None},  # both
    {**_PARAMS, "ema_decay": 0.7, "gamma_cap": 10.0},  # + bounded γ
    *(
        {**_PARAMS, "refresh_every": n, "refresh_micro_steps": which, "ema_decay": rho, "gamma_cap": 10.0}
        for n in (10, 5)
        for which in ("first_slot", "all")
        for rho in (0.5, 0.3)
    ),  # fmt: skip
    *(
        {"kind": "marble", "gram_source": "output", "ema_decay": rho, "gamma_cap": cap}
        for rho in (0.7, 0.5, 0.3, 0.0)
        for cap in (10.0, 50.0, None)
    ),  # fmt: skip
]
PRESETS = ("equal", "marble", "marble_paper", "marble_full", "marble_ub", "pcgrad", "cagrad")


class Saved:
    """The Grams of one alignment run (see `alignment.save_grams`)."""

    def __init__(self, path: Path):
        z = np.load(path)
        self.blocks = z["blocks"]  # [S, M*K, M*K] per-step block Gram of the micro-steps' gradients
        self.output = z["H"]  # [S, M, K, K] output-space Gram of every micro-step
        self.names = [str(n) for n in z["names"]]
        self.T = int(z["T"])  # timestep slots per micro-batch
        self.S, self.M, self.K = self.output.shape[:3]

    def gram(self, s: int, m: int) -> np.ndarray:
        K = self.K
        return self.blocks[s][m * K : (m + 1) * K, m * K : (m + 1) * K]


def _min_cos(gram: np.ndarray, gamma: np.ndarray) -> float:
    from marble.rl.diagnostics import gram_cosines

    return gram_cosines(torch.as_tensor(gram), torch.as_tensor(gamma)).min


def replay(saved: Saved, balancer: Any) -> tuple[list[tuple[float, bool]], list[tuple[float, bool]]]:
    """(min cos, refreshed here) per micro-batch and per step for one balancer along the saved run."""
    K, M = saved.K, saved.M
    micro, steps = [], []
    for s in range(saved.S):
        gammas = np.zeros((M, K))
        observed = np.zeros(M, dtype=bool)
        for m in range(M):
            G, H = saved.gram(s, m), torch.as_tensor(saved.output[s][m])
            if balancer.gram_source is not None and balancer.needs_gram(s, m):
                balancer.observe(H if balancer.gram_source == "output" else torch.as_tensor(G), s, m)
                observed[m] = True
            batch = torch.as_tensor(G) if balancer.gram_source == "per_sample" else H  # as NFTUpdate passes
            gammas[m] = balancer.batch_gamma(batch if balancer.needs_batch_gram else None).gamma.numpy()
            micro.append((_min_cos(G, gammas[m]), bool(observed[m])))
        balancer.end_step(s)
        # per step: <g_j(step), d> = Σ_{m, m'} <g_j(m'), Σ_k γ_k(m) g_k(m)>; |d|² = Γᵀ B Γ
        B = saved.blocks[s]
        flat = gammas.reshape(-1)  # [M*K]
        inner = (B @ flat).reshape(M, K).sum(0)  # [K]
        step_gram = B.reshape(M, K, M, K).sum((0, 2))  # [K, K] Gram of the step's summed gradients
        d_norm = np.sqrt(max(flat @ B @ flat, 0.0))
        g_norm = np.sqrt(np.clip(np.diag(step_gram), 0.0, None))
        ok = (g_norm > 1e-12) & (d_norm > 1e-12)
        cos = np.where(ok, inner / np.where(ok, g_norm * d_norm, 1.0), np.nan)
        steps.append((float(np.nanmin(cos)) if ok.any() else float("nan"), bool(observed.any())))
    return micro, steps


def summarize(records: list[tuple[float, bool]]) -> dict[str, Any]:
    mins = np.array([r[0] for r in records])
    refreshed = np.array([r[1] for r in records])
    ok = np.isfinite(mins)
    later = ok & ~refreshed
    return {
        "n": int(ok.sum()),
        "frac_min_negative": float((mins[ok] < 0).mean()),
        "mean_min_cos": float(mins[ok].mean()),
        "worst_min_cos": float(mins[ok].min()),
        "later_n": int(later.sum()),
        "later_frac_min_negative": float((mins[later] < 0).mean()) if later.any() else None,
    }


def build(cfg: Any, saved: Saved) -> Any:
    """marble's balancer for a config node, as the trainer builds it for the saved run."""
    from marble.rl.balancers import build_balancer

    return build_balancer(cfg, saved.names, saved.T)


def evaluate(runs: list[Saved], config: dict[str, Any]) -> dict[str, Any]:
    from pydantic import TypeAdapter

    from marble.config import BalancerConfig

    cfg = TypeAdapter(BalancerConfig).validate_python(config)
    micro, steps = [], []
    for saved in runs:
        mi, st = replay(saved, build(cfg, saved))
        micro += mi
        steps += st
    return {"config": cfg.model_dump(mode="json"), "micro_batch": summarize(micro), "step": summarize(steps)}


_SHORT = {"gram_source": "", "refresh_every": "N", "refresh_micro_steps": "", "ema_decay": "ρ",
          "gamma_cap": "cap", "refresh": "refresh=", "normalize": "norms="}  # fmt: skip


def _label(config: dict[str, Any]) -> str:
    """A config in one short line: the kind, then each field it sets (e.g. `N10 first_slot ρ0.3`)."""
    fields = [f"{_SHORT.get(k, k + '=')}{v}" for k, v in config.items() if k != "kind"]
    return " ".join([config["kind"], *fields] if fields else [config["kind"], "(preset)"])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grams", nargs="+", type=Path, help="npz files written by alignment --save-grams")
    ap.add_argument("--config", action="append", default=[], help="a balancer config as JSON (repeatable)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    runs = [Saved(p) for p in args.grams]
    configs = [json.loads(c) for c in args.config] or [{"kind": p} for p in PRESETS] + CANDIDATES
    print(
        f"{sum(r.S for r in runs)} steps, {sum(r.S * r.M for r in runs)} micro-batches, rewards {runs[0].names}"
    )
    print(f"{'':60s} {'per micro-batch: min cos < 0':>29s} | {'per step: min cos < 0':>29s}")
    print(f"{'balancer':60s} {'all':>6s} {'later':>6s} {'mean':>7s} {'worst':>7s} | {'all':>6s} {'later (n)':>11s} {'mean':>6s} {'worst':>6s}")  # fmt: skip
    results = []
    for config in configs:
        res = evaluate(runs, config)
        results.append(res)
        mb, st = res["micro_batch"], res["step"]

        def pct(x):
            return "   n/a" if x is None else f"{x:6.1%}"

        print(
            f"{_label(config):60.60s} {pct(mb['frac_min_negative'])} "
            f"{pct(mb['later_frac_min_negative'])} {mb['mean_min_cos']:7.3f} {mb['worst_min_cos']:7.2f} | "
            f"{pct(st['frac_min_negative'])} {pct(st['later_frac_min_negative'])} ({st['later_n']:2d}) "
            f"{st['mean_min_cos']:6.3f} {st['worst_min_cos']:6.2f}",
            flush=True,
        )
    if args.out:
        from bench.common import write_json

        write_json(args.out, {"grams": [str(p) for p in args.grams], "results": results})
    return results


if __name__ == "__main__":
    main()
