"""Gradient alignment of every balancer preset on the same batches.

Along a real training trajectory on the tiny world (the trainer's own epochs, driven by one preset,
`marble` by default), every micro-batch of every epoch is a diagnostic batch. On each one, ONCE:
the NFT terms (`NFTUpdate.forward`), the per-reward parameter gradients g_k of the masked per-reward
losses (KL excluded; `gram_from_params(keep_grads=True)`), their Gram G, the output-space Gram H, and
the gradient of the weighted-sum preset's single objective. Then, for each preset, its balancer
consumes the batch exactly as in training: if `needs_gram(step, micro_step)` it is updated with its
Gram (G or H) BEFORE the direction is formed (the trainer refreshes, then backprops); otherwise it
keeps the α it solved on an EARLIER batch. Its applied direction is `Σ γ_k g_k` (the affine identity:
exactly the gradient its (ω, ρ) loss gives), the weighted-sum preset's is its objective's gradient.

Per direction: `cos(d, g_k)` for every trained reward (`marble.rl.diagnostics.direction_cosines`),
summarised per batch by min, mean and variance over rewards; over batches: the fraction with
min < 0, the worst min, the mean variance. Also the fresh normalised-MGDA direction of each batch
(non-negative by construction on its own batch) and, for the cached presets, the same statistics
restricted to the batches that did NOT refresh ("later batches": the informative figure, §6).

Output-space vs parameter-space Gram: on each batch, the min-norm α from normalised G and from
normalised H (`MinNormSolver`), their L1 distance, whether their largest weight is on the same reward,
and the cosine between the two resulting parameter-space directions.

Run: `python -m bench.alignment [--epochs E]` -> bench/results/alignment.json and alignment.png.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common
from marble.threads import pinned_threads

log = logging.getLogger(__name__)

OUT_JSON = common.RESULTS / "alignment.json"
DIRECTIONS_EXTRA = ("fresh_mgda",)


def _cos_record(stats: Any, refreshed: bool | None = None) -> dict[str, Any]:
    rec = {"min": stats.min, "mean": stats.mean, "var": stats.var, "per_reward": stats.per_reward.tolist()}
    if refreshed is not None:
        rec["refreshed_here"] = refreshed
    return rec


def _mgda_alpha(G: torch.Tensor, solver: Any) -> tuple[np.ndarray, np.ndarray]:
    """(α on the simplex, γ = rescaled α) of one Gram, without EMA."""
    from marble.rl.balancers import rescale_to_gamma
    from marble.rl.gram import normalize_gram

    ng = normalize_gram(G)
    alpha = solver.solve(ng.gram_hat, ng.valid).alpha
    return alpha, rescale_to_gamma(alpha, ng.norms, ng.valid)


def measure_batch(
    world: common.World, mbs: dict[str, Any], balancers: dict[str, Any], step: int, micro: int, solver: Any
) -> dict[str, Any]:
    """Everything of one diagnostic batch. `mbs[p]`: the batch with preset p's objectives."""
    from marble.rl.diagnostics import direction_cosines
    from marble.rl.gram import flat_grads, gram_from_output, gram_from_params
    from marble.rl.nft import combine_coefficients, combined_loss, per_reward_losses

    tr = world.trainer
    beta = world.cfg.nft.beta
    mb = mbs["equal"]  # per-reward objectives: c == c_raw, r == r_raw
    terms, _, _ = tr.update.forward(mb, output_grads=True)
    losses = per_reward_losses(terms, mb.c_raw, mb.r_raw, beta)  # [K]
    pg = gram_from_params(losses, tr.params, keep_grads=True, retain_graph=True)
    grads = pg.grads.to(torch.float64)  # [K, P]
    H = gram_from_output(terms, mb.c_raw, mb.r_raw, beta)  # [K, K]
    out: dict[str, Any] = {"step": step, "micro_step": micro, "directions": {}}
    for name, bal in balancers.items():
        if bal.objective_names != tr.reward_names:  # weighted_sum, gdpo: one objective of their own
            ws = mbs[name]
            omega, rho = combine_coefficients(bal.gamma, ws.c, ws.r)  # one objective, γ = [1]
            d = flat_grads(combined_loss(terms, omega, rho, beta), tr.params, retain_graph=True)
            d = torch.where(torch.isfinite(d), d, torch.zeros_like(d)).to(torch.float64)
            out["directions"][name] = _cos_record(direction_cosines(d, grads), refreshed=False)
            continue
        refreshed = bool(bal.needs_gram(step, micro)) and bal.gram_source is not None
        if refreshed:
            bal.update(pg.gram if bal.gram_source == "params" else H, step=step)
        d = bal.gamma.to(torch.float64) @ grads  # [P] = the applied direction (affine identity)
        out["directions"][name] = _cos_record(direction_cosines(d, grads), refreshed=refreshed)
    alpha_p, gamma_p = _mgda_alpha(pg.gram, solver)
    alpha_o, gamma_o = _mgda_alpha(H, solver)
    d_p = torch.as_tensor(gamma_p) @ grads  # [P]
    d_o = torch.as_tensor(gamma_o) @ grads  # [P]
    out["directions"]["fresh_mgda"] = _cos_record(direction_cosines(d_p, grads))
    denom = float(d_p.norm() * d_o.norm())
    out["gram_sources"] = {
        "alpha_params": alpha_p.tolist(),
        "alpha_output": alpha_o.tolist(),
        "alpha_l1": float(np.abs(alpha_p - alpha_o).sum()),
        "argmax_agree": bool(np.argmax(alpha_p) == np.argmax(alpha_o)),
        "direction_cos": float(d_p @ d_o) / denom if denom > 0 else float("nan"),
        "grad_norms_params": pg.norms.tolist(),
        "grad_norms_output": torch.diagonal(H).clamp_min(0).sqrt().tolist(),
    }
    return out


def summarize_direction(records: list[dict[str, Any]], only_later: bool = False) -> dict[str, Any]:
    """Over batches: fraction with min cos < 0, worst min, mean of min/mean/var over rewards."""
    rs = [r for r in records if not (only_later and r.get("refreshed_here"))]
    mins = np.array([r["min"] for r in rs if r["min"] is not None and np.isfinite(r["min"])])
    if mins.size == 0:
        return {"batches": 0}
    means = np.array([r["mean"] for r in rs if np.isfinite(r["min"])])
    var = np.array([r["var"] for r in rs if np.isfinite(r["min"])])
    return {
        "batches": int(mins.size),
        "frac_min_negative": float((mins < 0).mean()),
        "worst_min_cos": float(mins.min()),
        "mean_min_cos": float(mins.mean()),
        "mean_cos": float(means.mean()),
        "mean_var_cos": float(var.mean()),
    }


def run(
    cfg,
    work: Path,
    *,
    epochs: int,
    driver: str = "marble",
    threads: int = 2,
    time_budget_s: float | None = None,
) -> dict[str, Any]:
    """Measure every batch of `epochs` training epochs (fewer if `time_budget_s` runs out first)."""
    from marble.rl.qp import MinNormSolver
    from marble.train.stepping import EpochPlan

    t_start = time.perf_counter()
    load_start = common.load_average()
    presets = list(common.PRESETS)
    with pinned_threads(threads):
        world = common.build_world(cfg, work, "alignment")
        tr = world.trainer
        driver_bal = common.make_balancer(world, driver)
        common.install_balancer(world, driver_bal)
        balancers = {p: common.make_balancer(world, p) for p in presets}
        solver = MinNormSolver()
        T, accum = world.cfg.num_train_timesteps, world.cfg.train.gradient_accumulation_steps
        batches: list[dict[str, Any]] = []
        epochs_done = 0
        for epoch in range(epochs):
            buf = world.buffer if epoch == 0 else tr.rollout(epoch)  # trainer's rollouts + rewards
            plans = {
                p: EpochPlan(world.cfg, common.buffer_for(world, balancers[p], buf), 1, 0, tr.grid)
                for p in presets
            }
            step0 = tr.step
            for b in range(plans["equal"].num_batches):
                step, bi = step0 + b // accum, b % accum
                for j in range(T):
                    mbs = {p: plans[p].micro_batch(b, j, tr.text_cache, tr.device) for p in presets}
                    rec = measure_batch(world, mbs, balancers, step, bi * T + j, solver)
                    rec["epoch"] = epoch
                    batches.append(rec)
            # then the epoch's real training steps (driver preset) and the old-policy blend, as train()
            tr.batch_pos = 0
            tr.train_epoch(common.buffer_for(world, driver_bal, buf))
            tr.blend_old_policy()
            log.info("alignment epoch %d/%d: %d batches so far", epoch + 1, epochs, len(batches))
            epochs_done = epoch + 1
            if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
                log.warning("alignment: time budget reached after %d epochs", epochs_done)
                break
        tr.cleanup()
    names = [*presets, *DIRECTIONS_EXTRA]
    summary: dict[str, Any] = {}
    for name in names:
        recs = [b["directions"][name] for b in batches]
        summary[name] = {"all_batches": summarize_direction(recs)}
        if name in balancers and balancers[name].gram_source is not None:
            summary[name]["later_batches"] = summarize_direction(recs, only_later=True)
            summary[name]["refreshes"] = sum(bool(r.get("refreshed_here")) for r in recs)
    gs = [b["gram_sources"] for b in batches]
    l1 = np.array([g["alpha_l1"] for g in gs])
    dcos = np.array([g["direction_cos"] for g in gs])
    gram_cmp = {
        "batches": len(gs),
        "alpha_l1_median": float(np.median(l1)),
        "alpha_l1_mean": float(l1.mean()),
        "alpha_l1_max": float(l1.max()),
        "argmax_agree_frac": float(np.mean([g["argmax_agree"] for g in gs])),
        "direction_cos_median": float(np.nanmedian(dcos)),
        "direction_cos_min": float(np.nanmin(dcos)),
        "alpha_params_mean": np.mean([g["alpha_params"] for g in gs], axis=0).tolist(),
        "alpha_output_mean": np.mean([g["alpha_output"] for g in gs], axis=0).tolist(),
    }
    return {
        "benchmark": "alignment",
        **common.environment(),
        "load_average": {"start": load_start, "end": common.load_average()},
        "settings": {
            "config": str(common.TINY_CONFIG.relative_to(common.REPO)),
            "epochs": epochs_done,
            "epochs_requested": epochs,
            "time_budget_s": time_budget_s,
            "driver": driver,
            "seed": world.cfg.train.seed,
            "torch_threads": threads,
            "rewards_trained": tr.reward_names,
            "batch": "one micro-batch at one timestep slot (train.micro_batch_size samples)",
            "balancers": {p: balancers[p].cfg.model_dump(mode="json") for p in presets},
        },
        "wall_seconds": time.perf_counter() - t_start,
        "directions": summary,
        "gram_sources": gram_cmp,
        "raw_batches": batches,
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    """Per-batch min cosine of each direction, and the fraction of batches with min < 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["directions"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    mins = [[b["directions"][n]["min"] for b in result["raw_batches"]] for n in names]
    mins = [[m for m in ms if m is not None and np.isfinite(m)] for ms in mins]
    axes[0].boxplot(mins, whis=(0, 100))
    axes[0].set_xticks(np.arange(1, len(names) + 1), names, rotation=35, ha="right")
    axes[0].axhline(0, color="k", lw=0.6)
    axes[0].set_ylabel("per batch: min over rewards of cos(d, g_k)")
    axes[0].set_title("distribution over batches (whiskers: min and max)", fontsize=9)
    frac = [result["directions"][n]["all_batches"].get("frac_min_negative", float("nan")) for n in names]
    later = [
        result["directions"][n].get("later_batches", {}).get("frac_min_negative", float("nan")) for n in names
    ]
    x = np.arange(len(names))
    axes[1].bar(x - 0.2, frac, width=0.4, label="all batches")
    axes[1].bar(x + 0.2, later, width=0.4, label="later batches (cached α)")
    axes[1].set_xticks(x, names, rotation=35, ha="right")
    axes[1].set_ylabel("fraction of batches with min cos < 0")
    axes[1].legend(fontsize=7)
    fig.suptitle(
        f"gradient alignment, tiny world, {result['settings']['epochs']} epochs driven by "
        f"{result['settings']['driver']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--driver", default="marble", choices=list(common.PRESETS))
    ap.add_argument("--time-budget", type=float, help="stop after the epoch that exceeds this many seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--work", type=Path, default=common.WORK_DIR)
    ap.add_argument("--out", type=Path, default=OUT_JSON)
    args = ap.parse_args(argv)
    cfg = common.bench_config(args.driver, args.overrides)
    result = run(
        cfg,
        args.work,
        epochs=args.epochs,
        driver=args.driver,
        threads=args.threads,
        time_budget_s=args.time_budget,
    )
    result["settings"]["overrides"] = args.overrides
    common.write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(f"alignment over {result['directions']['marble']['all_batches']['batches']} batches")
    print(f"  {'direction':13s} {'frac min<0':>10s} {'worst':>8s} {'var':>8s} {'later frac':>10s}")
    for name, s in result["directions"].items():
        a, lt = s["all_batches"], s.get("later_batches", {})
        print(
            f"  {name:13s} {a['frac_min_negative']:10.2f} {a['worst_min_cos']:8.3f} {a['mean_var_cos']:8.4f} "
            f"{lt.get('frac_min_negative', float('nan')):10.2f}"
        )
    g = result["gram_sources"]
    print(
        f"  output vs params Gram: α L1 median {g['alpha_l1_median']:.3f}, argmax agree {g['argmax_agree_frac']:.2f}"
    )
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
