"""The promotion gate: may this adapter become the `champion`?

Pure: it reads the evaluation's scores (`marble.eval.contract.EvalScores`, part of `eval.json`) and,
optionally, the current champion's per-reward means fetched from the registry. Every check is kept,
passed or not, so the report and the registry tags can say exactly why an adapter was (not) promoted.

The rules (GateConfig):
1. no TRAINED reward regresses: its mean drops by more than `max_regression` x the base model's std
   of that reward AND the drop is significant (the 95% CI of the paired delta lies below 0). Without
   the significance part, the default tolerance 0 would refuse every adapter over sampling noise on
   any one of K rewards (seen on a synthetic table: delta -0.008 with its CI straddling 0);
2. at least one trained reward improves: its 95% bootstrap CI of the paired delta lies above 0
   (`min_improvement_ci`), or, with that switched off, its mean delta is positive;
3. no HELD-OUT reward regresses beyond `max_held_out_regression` x its base std (same test as 1.);
4. every hacking monitor stays within `max_monitor_shift` relative change of the base
   (marble.eval.monitors.relative_shift);
5. the adapter is not Pareto-dominated by the champion on the trained rewards they share
   (`require_not_dominated`; skipped when there is no champion yet).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from marble.config import GateConfig
from marble.eval.contract import EvalScores, GateCheck, GateResult, RewardResult
from marble.eval.stats import dominates


def _drop_check(rule: str, name: str, r: RewardResult, tol_std: float) -> GateCheck:
    """Fail on a significant drop (CI of the delta below 0) larger than tol_std x base std."""
    delta, hi = r.delta.mean, r.delta.ci_hi
    if r.delta.n == 0 or not math.isfinite(delta):
        return GateCheck(
            rule=rule, subject=name, passed=True, detail="not applicable to any evaluated prompt; skipped"
        )
    base_std = r.base_std if math.isfinite(r.base_std) else 0.0
    tol = tol_std * base_std
    regressed = delta < -tol and hi < 0
    detail = (
        f"delta {delta:+.4g} (95% CI upper {hi:+.4g}) vs allowed drop {tol:.4g} "
        f"({tol_std:g} x base std {base_std:.4g})"
    )
    return GateCheck(rule=rule, subject=name, passed=not regressed, detail=detail)


def _improvement_check(trained: Mapping[str, RewardResult], use_ci: bool) -> GateCheck:
    better = []
    for name, r in trained.items():
        value = r.delta.ci_lo if use_ci else r.delta.mean
        if math.isfinite(value) and value > 0:
            better.append(name)
    what = "95% CI of the delta above 0" if use_ci else "mean delta above 0"
    if better:
        return GateCheck(
            rule="improvement", subject="*", passed=True, detail=f"{what} for {', '.join(better)}"
        )
    return GateCheck(
        rule="improvement", subject="*", passed=False, detail=f"no trained reward has its {what}"
    )


def _pareto_check(
    trained: Mapping[str, RewardResult], champion: Mapping[str, float] | None, champion_label: str
) -> GateCheck:
    def check(passed: bool, detail: str) -> GateCheck:
        return GateCheck(rule="pareto", subject="*", passed=passed, detail=detail)

    if not champion:
        return check(True, champion_label or "no champion yet")
    names = [n for n in trained if n in champion and math.isfinite(float(champion[n]))]
    if not names:
        return check(True, f"champion {champion_label} shares no trained reward; skipped")
    mine = np.array([trained[n].adapter.mean for n in names], dtype=np.float64)  # [K]
    theirs = np.array([float(champion[n]) for n in names], dtype=np.float64)  # [K]
    if dominates(theirs, mine):
        return check(False, f"dominated by champion {champion_label} on {', '.join(names)}")
    return check(True, f"not dominated by champion {champion_label} on {', '.join(names)}")


def evaluate_gate(
    scores: EvalScores,
    gate: GateConfig,
    champion: Mapping[str, float] | None = None,
    champion_label: str = "",
) -> GateResult:
    """Apply the gate to an evaluation's scores (an `EvalSummary` is one).

    Rewards are judged on their reported scale (the score their paper reports). `champion` maps reward
    name -> the champion's adapter mean on that scale (None: no champion yet, or none measured
    comparably; `champion_label` then says which).
    """
    trained, held_out = scores.trained(), scores.held_out()
    checks = [_drop_check("regression", n, r, gate.max_regression) for n, r in trained.items()]
    checks.append(_improvement_check(trained, gate.min_improvement_ci))
    checks += [_drop_check("held_out", n, r, gate.max_held_out_regression) for n, r in held_out.items()]
    for name, m in scores.monitors.items():
        shift = m.relative_shift
        detail = f"relative shift {shift:.3g} vs allowed {gate.max_monitor_shift:g}"
        checks.append(
            GateCheck(rule="monitor", subject=name, passed=shift <= gate.max_monitor_shift, detail=detail)
        )
    if gate.require_not_dominated:
        checks.append(_pareto_check(trained, champion, champion_label))
    return GateResult(passed=all(c.passed for c in checks), checks=checks)
