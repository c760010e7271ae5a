"""Micro-benchmark of the MARBLE balancer's own cost: K = 5 rewards on a small MLP.

Measures, as medians over interleaved repeats after a warm-up (wall clock, CPU, `--threads` torch threads):
- `train_step_ms`: forward + NFT terms + ONE backward of the (ω, ρ) loss (what every preset pays);
- `gram_params_ms`: the exact Gram from parameters (forward + K backward passes with a retained graph
  + the float64 Gram), and `gram_matmul_ms` the float64 Gram of the stacked `[K, P]` gradients alone;
- `gram_output_ms`: the output-space Gram from the three scalars per sample (marble_ub);
- `balancer_update_ms`: normalisation + QP + EMA + rescale (`balancer.update`);
- overhead of a refresh step vs. a plain step, and amortised per step with `refresh_every`;
- the osqp solve alone at K = 5, warm (kept solver, `update(Px=...)`) and cold (setup + solve), both raw
  osqp and through `MinNormSolver` (which adds the exact KKT refinement on osqp's support).

Run: `python -m bench.balancer_overhead` (writes bench/results/balancer_overhead.json). Not a test:
nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import osqp
import scipy.sparse as sp
import torch

from bench import common
from marble.config import MarblePaperBalancer
from marble.rl.advantages import group_advantages, optimality_probability
from marble.rl.balancers import build_balancer
from marble.rl.gram import gram_from_output, gram_from_params, stacked_gram
from marble.rl.nft import combine_coefficients, combined_loss, nft_terms, per_reward_losses, reward_weights
from marble.rl.qp import MinNormSolver

RESULTS = Path(__file__).parent / "results" / "balancer_overhead.json"


def _interleaved_medians(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3
) -> dict[str, float]:
    """Median wall time (ms) of each function, measured round-robin (A B C A B C ...) so that load
    drift on a shared machine hits every candidate alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _mlp(dim: int, hidden: int, layers: int) -> torch.nn.Module:
    mods: list[torch.nn.Module] = [torch.nn.Linear(dim + 1, hidden), torch.nn.SiLU()]
    for _ in range(layers - 2):
        mods += [torch.nn.Linear(hidden, hidden), torch.nn.SiLU()]
    mods.append(torch.nn.Linear(hidden, dim))
    return torch.nn.Sequential(*mods)


def _random_grams(K: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        X = rng.normal(size=(K, 64)) + rng.uniform(0, 1.5) * rng.normal(size=64)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        out.append(X @ X.T)
    return out


def bench_osqp(K: int, n: int, seed: int = 0) -> dict[str, float]:
    """Solve time of the K-reward simplex QP: raw osqp warm/cold and MinNormSolver warm/cold."""
    grams = _random_grams(K, n, np.random.default_rng(seed))
    rows = np.concatenate([np.arange(j + 1) for j in range(K)])
    cols = np.concatenate([np.full(j + 1, j) for j in range(K)])
    indptr = np.concatenate([[0], np.cumsum(np.arange(1, K + 1))])
    A = sp.csc_matrix(np.vstack([np.ones((1, K)), np.eye(K)]))
    lo, hi = np.r_[1.0, np.zeros(K)], np.r_[1.0, np.ones(K)]
    settings = dict(eps_abs=1e-9, eps_rel=1e-9, max_iter=20000, polishing=True, verbose=False)

    def setup(Q):
        s = osqp.OSQP()
        s.setup(
            sp.csc_matrix((Q[rows, cols], rows, indptr), shape=(K, K)), np.zeros(K), A, lo, hi, **settings
        )
        return s

    def timed(fn):
        ts = []
        for Q in grams:
            t0 = time.perf_counter()
            fn(Q)
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    warm = setup(grams[0])
    warm.solve(raise_error=False)
    mns_warm = MinNormSolver()
    mns_warm.solve(grams[0])
    return {
        "osqp_raw_warm_ms": timed(lambda Q: (warm.update(Px=Q[rows, cols]), warm.solve(raise_error=False))),
        "osqp_raw_cold_ms": timed(lambda Q: setup(Q).solve(raise_error=False)),
        "min_norm_solver_warm_ms": timed(mns_warm.solve),
        "min_norm_solver_cold_ms": timed(lambda Q: MinNormSolver().solve(Q)),
    }


def bench_step(
    K: int, batch: int, dim: int, hidden: int, layers: int, repeats: int, refresh_every: int
) -> dict:
    """Per-step costs of one micro-batch on an MLP velocity model."""
    g = torch.Generator().manual_seed(0)
    net, old = _mlp(dim, hidden, layers), _mlp(dim, hidden, layers)
    params = [p for p in net.parameters() if p.requires_grad]
    x0 = torch.randn(batch, dim, generator=g)
    eps = torch.randn(batch, dim, generator=g)
    t = torch.rand(batch, generator=g) * 0.9 + 0.05
    x_t = (1 - t[:, None]) * x0 + t[:, None] * eps
    inp = torch.cat([x_t, t[:, None]], 1)
    R = torch.randn(batch, K, generator=g, dtype=torch.float64)
    R[torch.rand(batch, K, generator=g) < 0.3] = float("nan")
    r, mask = optimality_probability(group_advantages(R, torch.arange(batch) // 4).adv, 5.0)
    c = reward_weights(mask, 5.0)
    beta = 0.1
    balancer = build_balancer(MarblePaperBalancer(refresh_every=refresh_every), [f"r{k}" for k in range(K)])
    with torch.no_grad():
        v_old = old(inp)

    def terms():
        return nft_terms(net(inp), v_old, x_t, x0, t, beta)

    def plain_step():
        tm = terms()
        omega, rho = combine_coefficients(balancer.gamma, c, r)
        combined_loss(tm, omega, rho, beta).backward()
        net.zero_grad(set_to_none=True)

    def gram_params():
        tm = terms()
        return gram_from_params(per_reward_losses(tm, c, r, beta), params, retain_graph=False).gram

    def refresh_step():
        tm = terms()
        G = gram_from_params(per_reward_losses(tm, c, r, beta), params).gram
        balancer.update(G)
        omega, rho = combine_coefficients(balancer.gamma, c, r)
        combined_loss(tm, omega, rho, beta).backward()
        net.zero_grad(set_to_none=True)

    tm_fixed = terms()
    G_fixed = gram_params()
    stacked = torch.randn(K, sum(p.numel() for p in params), generator=g)  # [K, P]
    out: dict = {"num_params": sum(p.numel() for p in params)}
    out |= _interleaved_medians(
        {
            "train_step_ms": plain_step,
            "forward_terms_ms": terms,
            "gram_params_ms": gram_params,
            "gram_matmul_ms": lambda: stacked_gram(stacked),
            "gram_output_ms": lambda: gram_from_output(tm_fixed, c, r, beta),
            "balancer_update_ms": lambda: balancer.update(G_fixed),
            "refresh_step_ms": refresh_step,
        },
        repeats,
    )
    overhead = out["refresh_step_ms"] - out["train_step_ms"]
    out["refresh_overhead_ms"] = overhead
    out["refresh_every"] = refresh_every
    out["amortized_overhead_ms_per_step"] = overhead / refresh_every
    out["amortized_speed_ratio_vs_plain"] = out["train_step_ms"] / (
        out["train_step_ms"] + overhead / refresh_every
    )
    out["full_speed_ratio_vs_plain"] = out["train_step_ms"] / out["refresh_step_ms"]
    return out


def plot(result: dict, path: Path) -> Path:
    """Left: what one step costs, plain vs refresh, by part. Right: the QP solve alone, warm vs cold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, qp, s = result["step"], result["qp"], result["settings"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    parts = {
        "plain step\n(1 backward)": st["train_step_ms"],
        f"Gram from params\n(K={s['K']} backwards)": st["gram_params_ms"],
        "  of which\n[K,P] matmul": st["gram_matmul_ms"],
        "Gram from\noutput": st["gram_output_ms"],
        "balancer.update\n(QP, EMA, rescale)": st["balancer_update_ms"],
        "refresh step": st["refresh_step_ms"],
        f"amortised overhead\n(1 in {st['refresh_every']})": st["amortized_overhead_ms_per_step"],
    }
    a.bar(range(len(parts)), list(parts.values()), color=["C0", "C3", "C3", "C2", "C1", "C3", "C1"])
    a.set_xticks(range(len(parts)), list(parts), fontsize=7)
    a.set_ylabel("ms (median)")
    a.set_title(f"K={s['K']} rewards, MLP {st['num_params']:,} params, batch {s['batch']}", fontsize=9)
    names = list(qp)
    b.bar(range(len(names)), [qp[n] for n in names], color="C1")
    b.set_xticks(range(len(names)), [n.replace("_ms", "").replace("_", "\n", 2) for n in names], fontsize=7)
    b.set_yscale("log")
    b.set_ylabel("ms per solve (median, log)")
    b.set_title(f"osqp min-norm QP at K={s['K']}, {s['qp_problems']} random Grams", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--K", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256, help="elements per latent (MLP in/out width)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--qp-problems", type=int, default=300)
    ap.add_argument("--refresh-every", type=int, default=10)
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (1 default: with 2 threads on a shared 2-core machine, timings swing 10x)",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    step = bench_step(
        args.K, args.batch, args.dim, args.hidden, args.layers, args.repeats, args.refresh_every
    )
    qp = bench_osqp(args.K, args.qp_problems)

    result = {
        "benchmark": "balancer_overhead",
        **common.environment(),
        "load_average": common.load_average(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "step": step,
        "qp": qp,
    }
    common.write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(
        f"balancer overhead, K={args.K}, MLP {step['num_params']:,} params, batch {args.batch} (medians, ms)"
    )
    for key in ("train_step_ms", "gram_params_ms", "gram_matmul_ms", "gram_output_ms", "balancer_update_ms", "refresh_step_ms",
                "refresh_overhead_ms", "amortized_overhead_ms_per_step"):  # fmt: skip
        print(f"  {key:34s} {step[key]:10.3f}")
    print(
        f"  {'speed vs plain, refresh every ' + str(args.refresh_every):34s} {step['amortized_speed_ratio_vs_plain']:10.3f}x"
    )
    print(f"  {'speed vs plain, refresh every step':34s} {step['full_speed_ratio_vs_plain']:10.3f}x")
    print(f"osqp at K={args.K} over {args.qp_problems} random Grams (median ms)")
    for key, val in qp.items():
        print(f"  {key:34s} {val:10.4f}")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
