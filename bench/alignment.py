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

Cheaper Grams than G (`ProxyGrams`): how well can ANY balancer do on a batch without the K backward
passes of the exact Gram? On every batch, the fresh min-norm direction of each cheaper Gram, formed
from the exact gradients (`fresh_output`: H; `fresh_last_layer`: the gradients of the output
projection's weight and bias; `fresh_last_block`: the gradients of the last transformer block's LoRA
parameters), with the milliseconds each Gram took. A fresh solve on the batch itself is the best a
Gram source allows; an amortized α of the same source does not do better on average.

Micro-batch size: `--micro-batch N` (with `--set sampling.prompts_per_epoch=...` for the samples of a
step) measures the same comparison at another granularity, e.g. 8 (a rank's micro-batch in
`configs/sd35m-marble.yaml`) or 64 (the global micro-batch of 8 GPUs x 8, whose Gram is all-reduced):
a specialist reward is sparser or denser in each Gram the balancer sees.

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
from marble.rl.per_sample import PerRewardLinearGrads
from marble.threads import pinned_threads

log = logging.getLogger(__name__)

OUT_JSON = common.RESULTS / "alignment.json"
PROXY_SOURCES = ("output", "last_layer", "last_block", "per_sample")
DIRECTIONS_EXTRA = ("fresh_mgda", *(f"fresh_{s}" for s in PROXY_SOURCES))


class ProxyGrams:
    """Grams of the per-reward gradients of fewer parameters than the trained ones, on one batch.

    - `last_layer`: the weight and bias of the transformer's output projection `proj_out` (frozen,
      not trained: a feature of the batch, the "last shared layer" of GradNorm, Chen et al. 2018).
      From its input z `[B, T, h]` (a forward hook on the first forward with a graph: the trained
      adapter's) and each reward's gradient at its output `[B, T, o]` (a backward through the
      un-patchify and the loss only): `E_k = Σ_tokens gy_k ⊗ [z, 1]`, `G_kl = <E_k, E_l>`.
    - `last_block`: the LoRA parameters of the last transformer block (K backward passes that stop
      at that block).
    - `per_sample`: every trained parameter, from ONE backward of `Σ_i N_i` to the LoRA layers'
      outputs, whose per-sample gradients are weighted per reward (`marble.rl.per_sample`). Exact up
      to the collinearity residual of the NFT output gradients, recorded per batch. Its milliseconds
      are those of that backward and products minus a plain backward of the same loss to the weights:
      the cost a trainer adds to (negative: saves from) the backward it would run anyway
      (`backward_ms` records the plain one).
    """

    def __init__(self, model: Any, params: list[torch.Tensor]):
        named = dict(model.named_modules())
        outs = [
            m for n, m in named.items() if n.split(".")[-1] == "proj_out" and "transformer_blocks" not in n
        ]
        if len(outs) != 1:
            raise ValueError(f"ProxyGrams: expected one output projection proj_out, found {len(outs)}")
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        blocks = [
            int(n.split("transformer_blocks.")[1].split(".")[0])
            for n, _ in trained
            if "transformer_blocks." in n
        ]
        last = f"transformer_blocks.{max(blocks)}."
        self.block_params = [p for n, p in trained if last in n]
        self.per_sample = PerRewardLinearGrads.of_trained(model)
        if [id(m.weight) for m in self.per_sample.modules] != [id(p) for p in params if p.requires_grad]:
            raise ValueError("ProxyGrams: the per-sample layers are not the trained parameters, in order")
        self._capture: dict[str, torch.Tensor] = {}
        self._handle = outs[0].register_forward_hook(self._hook)

    def _hook(self, module: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if output.requires_grad and not self._capture:  # the trained adapter's forward, not old / ref
            self._capture = {"z": inputs[0], "y": output}

    def reset(self) -> None:
        """Forget the captured forward: call before each batch's forward."""
        self._capture = {}

    def last_layer_gram(self, losses: torch.Tensor) -> torch.Tensor:
        from marble.rl.gram import stacked_gram

        z = self._capture["z"].detach().to(torch.float64)  # [B, T, h]
        z1 = torch.cat([z, torch.ones_like(z[..., :1])], -1)  # [B, T, h + 1]: the bias's input is 1
        y = self._capture["y"]
        rows = []
        for loss in losses:
            gy = torch.autograd.grad(loss, y, retain_graph=True, allow_unused=True)[0]
            gy = torch.zeros_like(y) if gy is None else gy
            rows.append(torch.einsum("bto,bth->oh", gy.to(torch.float64), z1).reshape(-1))
        return stacked_gram(torch.stack(rows))  # [K, K]

    def per_sample_gram(self, terms: Any, c: torch.Tensor, r: torch.Tensor, beta: float) -> dict[str, Any]:
        """The per-sample Gram of a batch whose forward ran inside `self.per_sample.capture()`: a plain
        backward of `Σ_i N_i` to the trained weights (timed), then the per-reward one (timed), which runs
        to the layers' outputs and replaces it in a trainer; `ms` is their difference (negative: the
        per-reward backward is the cheaper)."""
        from marble.rl.gram import stacked_gram
        from marble.rl.per_sample import collinearity_residual, per_sample_coefficients

        weights = [m.weight for m in self.per_sample.modules]
        loss = terms.N.sum()
        ms_plain, _ = common.timed(lambda: torch.autograd.grad(loss, weights, retain_graph=True))
        coefficients = per_sample_coefficients(terms, c, r, beta)

        def gram() -> tuple[torch.Tensor, torch.Tensor]:
            grads = self.per_sample.per_reward_grads(loss, coefficients, retain_graph=True)  # [K, P]
            return stacked_gram(grads), grads

        ms, (G, grads) = common.timed(gram)
        resid = collinearity_residual(terms)  # [B], NaN where p_i = 0
        resid = resid[torch.isfinite(resid)]
        return {
            "gram": G,
            "grads": grads.to(torch.float64),
            "ms": ms - ms_plain,
            "backward_ms": ms_plain,
            "residual_max": float(resid.max()) if resid.numel() else 0.0,
        }

    def grams(self, losses: torch.Tensor) -> dict[str, tuple[torch.Tensor, float]]:
        """(Gram `[K, K]`, milliseconds) of the last layer and the last block."""
        from marble.rl.gram import gram_from_params

        ms_layer, layer = common.timed(lambda: self.last_layer_gram(losses))
        ms_block, block = common.timed(
            lambda: gram_from_params(losses, self.block_params, retain_graph=True).gram
        )
        return {"last_layer": (layer, ms_layer), "last_block": (block, ms_block)}

    def close(self) -> None:
        self._handle.remove()


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
    world: common.World,
    mbs: dict[str, Any],
    balancers: dict[str, Any],
    step: int,
    micro: int,
    solver: Any,
    proxies: ProxyGrams | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Everything of one diagnostic batch. `mbs[p]`: the batch with preset p's objectives. Returns the
    record and the vectors the per-step figures add up (`grads [K, P]`, each direction `[P]`; the
    fresh directions of the cheaper Grams are summed per step like a preset's: what a balancer
    solving each batch on that Gram would apply)."""
    from marble.rl.diagnostics import direction_cosines
    from marble.rl.gram import flat_grads, gram_from_output, gram_from_params
    from marble.rl.nft import combine_coefficients, combined_loss, per_reward_losses

    tr = world.trainer
    beta = world.cfg.nft.beta
    mb = mbs["equal"]  # per-reward objectives: c == c_raw, r == r_raw
    per_sample = None
    if proxies is None:
        terms, _, _ = tr.update.forward(mb, output_grads=True)
    else:
        proxies.reset()
        with proxies.per_sample.capture():
            terms, _, _ = tr.update.forward(mb, output_grads=True)
            per_sample = proxies.per_sample_gram(terms, mb.c_raw, mb.r_raw, beta)
    losses = per_reward_losses(terms, mb.c_raw, mb.r_raw, beta)  # [K]
    ms_params, pg = common.timed(
        lambda: gram_from_params(losses, tr.params, keep_grads=True, retain_graph=True)
    )
    grads = pg.grads.to(torch.float64)  # [K, P]
    ms_output, H = common.timed(lambda: gram_from_output(terms, mb.c_raw, mb.r_raw, beta))  # [K, K]
    out: dict[str, Any] = {"step": step, "micro_step": micro, "directions": {}}
    cheaper = {"output": (H, ms_output), **(proxies.grams(losses) if proxies is not None else {})}
    if per_sample is not None:
        cheaper["per_sample"] = (per_sample["gram"], per_sample["ms"])
    # what a per_sample balancer works with: the Gram and per-reward gradients the trainer would form
    # (exact up to the collinearity residual), so its rows measure what training applies
    ps_gram, ps_grads = (per_sample["gram"], per_sample["grads"]) if per_sample else (pg.gram, grads)
    dirs: dict[str, torch.Tensor] = {}
    step_solve: dict[str, torch.Tensor] = {}
    for name, bal in balancers.items():
        if bal.solves_step:  # solved on the step's summed gradients: `solve_on_steps` at the step's end
            step_solve[name] = ps_grads
            continue
        if bal.objective_names != tr.reward_names:  # weighted_sum, gdpo: one objective of their own
            ws = mbs[name]
            omega, rho = combine_coefficients(bal.gamma, ws.c, ws.r)  # one objective, γ = [1]
            d = flat_grads(combined_loss(terms, omega, rho, beta), tr.params, retain_graph=True)
            dirs[name] = torch.where(torch.isfinite(d), d, torch.zeros_like(d)).to(torch.float64)
            out["directions"][name] = _cos_record(direction_cosines(dirs[name], grads), refreshed=False)
            continue
        # the trainer's protocol (NFTUpdate.micro_step): observe the Gram if asked, then γ for this batch
        refreshed = bool(bal.needs_gram(step, micro)) and bal.gram_source is not None
        own = bal.gram_source == "per_sample"
        if refreshed:
            bal.observe(H if bal.gram_source == "output" else ps_gram if own else pg.gram, step, micro)
        batch = ps_gram if own else H  # the batch Gram the trainer passes (NFTUpdate)
        gamma = bal.batch_gamma(batch if bal.needs_batch_gram else None).gamma
        formed = ps_grads if own else grads  # [K, P]
        dirs[name] = gamma.to(torch.float64) @ formed  # [P] = the applied direction (affine identity)
        out["directions"][name] = _cos_record(direction_cosines(dirs[name], grads), refreshed=refreshed)
    alpha_p, gamma_p = _mgda_alpha(pg.gram, solver)
    d_p = torch.as_tensor(gamma_p) @ grads  # [P]
    out["directions"]["fresh_mgda"] = _cos_record(direction_cosines(d_p, grads))
    out["gram_ms"] = {"params": ms_params}
    if per_sample is not None:
        out["per_sample"] = {
            "backward_ms": per_sample["backward_ms"],
            "residual_max": per_sample["residual_max"],
        }
    alphas: dict[str, np.ndarray] = {}
    for source, (gram, ms) in cheaper.items():
        name = f"fresh_{source}"
        alphas[source], gamma = _mgda_alpha(gram, solver)
        formed = ps_grads if source == "per_sample" else grads  # [K, P], as training would form it
        dirs[name] = torch.as_tensor(gamma) @ formed  # [P]
        out["directions"][name] = _cos_record(direction_cosines(dirs[name], grads), refreshed=False)
        out["gram_ms"][source] = ms
    alpha_o, d_o = alphas["output"], dirs["fresh_output"]  # the output-space Gram's fresh solve
    denom = float(d_p.norm() * d_o.norm())
    out["gram_sources"] = {
        "alpha_params": alpha_p.tolist(),
        "alpha_output": alpha_o.tolist(),
        "alpha_l1": float(np.abs(alpha_p - alpha_o).sum()),
        "argmax_agree": bool(np.argmax(alpha_p) == np.argmax(alpha_o)),
        "direction_cos": float(d_p @ d_o) / denom if denom > 0 else float("nan"),
        "grad_norms_params": pg.norms.tolist(),
        "grad_norms_output": torch.diagonal(H).clamp_min(0).sqrt().tolist(),
        "gram_params": pg.gram.tolist(),
        "gram_output": H.tolist(),
    }
    return out, {"grads": grads, "dirs": dirs, "step_solve": step_solve}


def solve_on_steps(balancers: dict[str, Any], step_batches: list[tuple[dict, dict]], step: int) -> None:
    """The presets that solve on the optimizer step (`marble_step`), as `NFTUpdate.end_step` does: one
    solve on the Gram of the per-reward gradients summed over the step's micro-batches; each micro-batch's
    direction is then that γ times its own gradients (the applied update is their sum)."""
    from marble.rl.diagnostics import direction_cosines
    from marble.rl.gram import stacked_gram

    for name, bal in balancers.items():
        if not bal.solves_step:
            continue
        summed = sum(vecs["step_solve"][name] for _, vecs in step_batches)  # [K, P]
        bal.solve_step(stacked_gram(summed), step)
        gamma = bal.gamma.to(torch.float64)  # [K]
        for rec, vecs in step_batches:
            d = gamma @ vecs["step_solve"][name].to(torch.float64)  # [P]
            vecs["dirs"][name] = d
            rec["directions"][name] = _cos_record(direction_cosines(d, vecs["grads"]), refreshed=True)


class StepTotals:
    """Per optimizer step: the per-reward gradients and each preset's applied direction summed over
    the step's micro-batches (the update actually applied, up to the optimizer), and their cosines."""

    def __init__(self) -> None:
        self.grads: torch.Tensor | None = None  # [K, P]
        self.dirs: dict[str, torch.Tensor] = {}
        self.refreshed: dict[str, bool] = {}
        self.micro_grads: list[torch.Tensor] = []  # each micro-step's [K, P] (the replay's block Gram)
        self.output_grams: list[list[list[float]]] = []  # each micro-step's output-space Gram [K, K]

    def add(self, rec: dict[str, Any], vecs: dict[str, Any]) -> None:
        g = vecs["grads"]
        self.micro_grads.append(g)
        self.output_grams.append(rec["gram_sources"]["gram_output"])
        self.grads = g.clone() if self.grads is None else self.grads + g
        for name, d in vecs["dirs"].items():
            self.dirs[name] = d.clone() if name not in self.dirs else self.dirs[name] + d
            self.refreshed[name] = self.refreshed.get(name, False) or bool(
                rec["directions"][name].get("refreshed_here")
            )

    def record(self, step: int, solver: Any) -> dict[str, Any]:
        from marble.rl.diagnostics import direction_cosines
        from marble.rl.gram import stacked_gram

        out: dict[str, Any] = {"step": step, "directions": {}}
        for name, d in self.dirs.items():
            out["directions"][name] = _cos_record(direction_cosines(d, self.grads), self.refreshed[name])
        _, gamma = _mgda_alpha(stacked_gram(self.grads), solver)
        fresh = torch.as_tensor(gamma) @ self.grads  # [P] the fresh MGDA direction of the step
        out["directions"]["fresh_mgda"] = _cos_record(direction_cosines(fresh, self.grads))
        return out

    def block_gram(self) -> np.ndarray:
        """`[M·K, M·K]` Gram of every micro-step's per-reward gradients, micro-step-major: every inner
        product the replay needs (`bench/alignment_replay.py`)."""
        X = torch.cat(self.micro_grads, 0)  # [M*K, P]
        return (X @ X.T).numpy()


def save_grams(path: Path, blocks: list[np.ndarray], output: list[Any], names: list[str], T: int) -> Path:
    """The Grams `bench/alignment_replay.py` replays balancer settings on, written atomically:
    `blocks [S, M·K, M·K]`, `H [S, M, K, K]` (output-space Gram per micro-step), reward `names`, `T`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, blocks=np.stack(blocks), H=np.asarray(output, dtype=np.float64), names=np.array(names), T=T)
    tmp.replace(path)
    return path


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
    grams_out: Path | None = None,
) -> dict[str, Any]:
    """Measure every batch of `epochs` training epochs (fewer if `time_budget_s` runs out first);
    with `grams_out`, also save every step's Grams for `bench/alignment_replay.py`."""
    from marble.rl.qp import MinNormSolver
    from marble.train.stepping import EpochPlan

    t_start = time.perf_counter()
    load_start = common.load_average()
    presets = list(common.PRESETS)
    with pinned_threads(threads):
        world = common.build_world(cfg, work, "alignment")
        t_budget = time.perf_counter()  # the budget is for measuring: a first model build is not charged
        tr = world.trainer
        driver_bal = common.make_balancer(world, driver)
        common.install_balancer(world, driver_bal)
        balancers = {p: common.make_balancer(world, p) for p in presets}
        solver = MinNormSolver()
        proxies = ProxyGrams(tr.model, tr.params)
        T, accum = world.cfg.num_train_timesteps, world.cfg.train.gradient_accumulation_steps
        batches: list[dict[str, Any]] = []
        steps: list[dict[str, Any]] = []
        blocks: list[np.ndarray] = []
        output_grams: list[Any] = []
        epochs_done = 0
        for epoch in range(epochs):
            buf = world.buffer if epoch == 0 else tr.rollout(epoch)  # trainer's rollouts + rewards
            plans = {
                p: EpochPlan(world.cfg, common.buffer_for(world, balancers[p], buf), 1, 0, tr.grid)
                for p in presets
            }
            step0 = tr.step
            totals = StepTotals()
            step_batches: list[tuple[dict, dict]] = []
            for b in range(plans["equal"].num_batches):
                step, bi = step0 + b // accum, b % accum
                for j in range(T):
                    mbs = {p: plans[p].micro_batch(b, j, tr.text_cache, tr.device) for p in presets}
                    rec, vecs = measure_batch(world, mbs, balancers, step, bi * T + j, solver, proxies)
                    rec["epoch"] = epoch
                    batches.append(rec)
                    step_batches.append((rec, vecs))
                if bi == accum - 1:  # the step's last micro-batch: every preset ends its step
                    for bal in balancers.values():
                        bal.end_step(step)
                    solve_on_steps(balancers, step_batches, step)
                    for rec, vecs in step_batches:
                        totals.add(rec, vecs)
                    step_batches = []
                    steps.append({**totals.record(step, solver), "epoch": epoch})
                    if grams_out is not None:
                        blocks.append(totals.block_gram())
                        output_grams.append(totals.output_grams)
                    totals = StepTotals()
            # then the epoch's real training steps (driver preset) and the old-policy blend, as train()
            tr.batch_pos = 0
            tr.train_epoch(common.buffer_for(world, driver_bal, buf))
            tr.blend_old_policy()
            log.info("alignment epoch %d/%d: %d batches so far", epoch + 1, epochs, len(batches))
            if grams_out is not None:  # after every epoch: a stopped run still leaves its Grams
                save_grams(grams_out, blocks, output_grams, tr.reward_names, T)
            epochs_done = epoch + 1
            if time_budget_s is not None and time.perf_counter() - t_budget > time_budget_s:
                log.warning("alignment: time budget reached after %d epochs", epochs_done)
                break
        proxies.close()
        tr.cleanup()
    names = [*presets, *DIRECTIONS_EXTRA]
    summary: dict[str, Any] = {}
    for name in names:
        recs = [b["directions"][name] for b in batches]
        srecs = [s["directions"][name] for s in steps]
        summary[name] = {"all_batches": summarize_direction(recs), "all_steps": summarize_direction(srecs)}
        if name in balancers and balancers[name].gram_source is not None:
            summary[name]["later_batches"] = summarize_direction(recs, only_later=True)
            summary[name]["refreshes"] = sum(bool(r.get("refreshed_here")) for r in recs)
            summary[name]["later_steps"] = summarize_direction(srecs, only_later=True)
            summary[name]["refresh_steps"] = sum(bool(r.get("refreshed_here")) for r in srecs)
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
        "gram_ms_median": {
            src: common.median([b["gram_ms"][src] for b in batches]) for src in ("params", *PROXY_SOURCES)
        },
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
            "micro_batch_size": world.cfg.train.micro_batch_size,
            "gradient_accumulation_steps": accum,
            "samples_per_step": world.cfg.train.micro_batch_size * accum,
            "samples_per_epoch": world.cfg.sampling.samples_per_epoch,
            "train_timesteps": T,
            "torch_threads": threads,
            "rewards_trained": tr.reward_names,
            "batch": "one micro-batch at one timestep slot (train.micro_batch_size samples)",
            "step": "one optimizer step: gradients and directions summed over its micro-batches and slots",
            "balancers": {p: balancers[p].cfg.model_dump(mode="json") for p in presets},
        },
        "wall_seconds": time.perf_counter() - t_start,
        "directions": summary,
        "gram_sources": gram_cmp,
        "raw_batches": batches,
        "raw_steps": steps,
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
    x = np.arange(len(names))
    groups = (
        ("all_batches", "micro-batches"),
        ("later_batches", "micro-batches it did not refresh on"),
        ("all_steps", "optimizer steps"),
        ("later_steps", "optimizer steps it did not refresh on"),
    )
    for i, (key, label) in enumerate(groups):
        frac = [result["directions"][n].get(key, {}).get("frac_min_negative", float("nan")) for n in names]
        axes[1].bar(x + (i - 1.5) * 0.2, frac, width=0.2, label=label)
    axes[1].set_xticks(x, names, rotation=35, ha="right")
    axes[1].set_ylabel("fraction with min cos < 0")
    axes[1].legend(fontsize=7)
    fig.suptitle(
        f"gradient alignment, tiny world, {result['settings']['epochs']} epochs driven by "
        f"{result['settings']['driver']}, micro-batch {result['settings']['micro_batch_size']} x "
        f"{result['settings']['gradient_accumulation_steps']} per optimizer step",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def micro_batch_overrides(cfg, micro_batch: int) -> list[str]:
    """`--set` overrides for micro-batches of `micro_batch` samples, one optimizer step per epoch.

    A multi-GPU step's balancer sees the Gram summed over every rank's micro-batch (all-reduced), so
    one process with the global micro-batch measures what N ranks of micro_batch / N would."""
    samples = cfg.sampling.samples_per_epoch
    if micro_batch < 1 or samples % micro_batch:
        raise SystemExit(
            f"--micro-batch {micro_batch} must divide the epoch's {samples} samples "
            "(sampling.group_size x sampling.prompts_per_epoch; change them with --set)"
        )
    return [
        f"train.micro_batch_size={micro_batch}",
        f"train.gradient_accumulation_steps={samples // micro_batch}",
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--driver", default="marble", choices=list(common.PRESETS))
    ap.add_argument("--time-budget", type=float, help="stop after the epoch that exceeds this many seconds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument(
        "--micro-batch",
        type=int,
        help="samples per micro-batch (one rank's, or all ranks' of a multi-GPU step); the accumulation "
        "is set so that one optimizer step still takes the whole epoch",
    )
    ap.add_argument("--work", type=Path, default=common.WORK_DIR)
    ap.add_argument("--out", type=Path, default=OUT_JSON)
    ap.add_argument(
        "--save-grams", type=Path, help="also save every step's Grams here (.npz) for alignment_replay"
    )
    args = ap.parse_args(argv)
    if args.micro_batch is not None:
        # the epoch's samples, from a config any sampling override keeps valid (one sample per micro-step)
        one = ["train.micro_batch_size=1", "train.gradient_accumulation_steps=1"]
        args.overrides += micro_batch_overrides(
            common.bench_config(args.driver, [*args.overrides, *one]), args.micro_batch
        )
    cfg = common.bench_config(args.driver, args.overrides)
    result = run(
        cfg,
        args.work,
        epochs=args.epochs,
        driver=args.driver,
        threads=args.threads,
        time_budget_s=args.time_budget,
        grams_out=args.save_grams,
    )
    result["settings"]["overrides"] = args.overrides
    common.write_json(args.out, result)
    plot(result, args.out.with_suffix(".png"))
    print(f"alignment over {result['directions']['marble']['all_batches']['batches']} batches")
    print(
        f"  {'direction':17s} {'frac min<0':>10s} {'worst':>8s} {'var':>8s} {'later frac':>10s} | per step: all, later"
    )
    nan = float("nan")
    for name, s in result["directions"].items():
        a, lt = s["all_batches"], s.get("later_batches", {})
        sa, sl = s["all_steps"], s.get("later_steps", {})
        print(
            f"  {name:17s} {a['frac_min_negative']:10.2f} {a['worst_min_cos']:8.3f} {a['mean_var_cos']:8.4f} "
            f"{lt.get('frac_min_negative', nan):10.2f} | {sa.get('frac_min_negative', nan):5.2f} "
            f"{sl.get('frac_min_negative', nan):5.2f} ({sl.get('batches', 0)} later steps)"
        )
    g = result["gram_sources"]
    print(
        f"  output vs params Gram: α L1 median {g['alpha_l1_median']:.3f}, argmax agree {g['argmax_agree_frac']:.2f}"
    )
    print(
        "  Gram ms per batch (median): " + ", ".join(f"{k} {v:.2f}" for k, v in g["gram_ms_median"].items())
    )
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()
