"""The promotion gate: may this adapter become the `champion`?

Pure: it reads the evaluation summary (the `eval.json` dict written by `marble.eval.evaluate`) and,
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
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from marble.config import GateConfig
from marble.eval.stats import dominates


@dataclass(frozen=True)
class GateCheck:
    """One rule applied to one reward or monitor."""

    rule: str  # "regression" | "improvement" | "held_out" | "monitor" | "pareto"
    subject: str  # reward or monitor name ("*" for rules over all rewards)
    passed: bool
    detail: str


@dataclass
class GateResult:
    passed: bool
    checks: list[GateCheck] = field(default_factory=list)

    @property
    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> str:
        """One line: 'passed' or the failing checks."""
        if self.passed:
            return "passed"
        return "failed: " + "; ".join(f"{c.rule}/{c.subject}: {c.detail}" for c in self.failures)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "summary": self.summary(), "checks": [asdict(c) for c in self.checks]}


def _drop_check(rule: str, name: str, stats: Mapping[str, Any], tol_std: float) -> GateCheck:
    """Fail on a significant drop (CI of the delta below 0) larger than tol_std x base std."""
    d = stats["delta"]
    delta, hi = d["mean"], d.get("ci_hi", d["mean"])
    if d.get("n", 1) == 0 or not math.isfinite(delta):
        return GateCheck(rule, name, True, "not applicable to any evaluated prompt; skipped")
    base_std = float(stats.get("base_std") or 0.0)
    tol = tol_std * base_std
    regressed = delta < -tol and hi < 0
    detail = (
        f"delta {delta:+.4g} (95% CI upper {hi:+.4g}) vs allowed drop {tol:.4g} "
        f"({tol_std:g} x base std {base_std:.4g})"
    )
    return GateCheck(rule, name, not regressed, detail)


def _improvement_check(trained: Mapping[str, Mapping[str, Any]], use_ci: bool) -> GateCheck:
    better = []
    for name, s in trained.items():
        d = s["delta"]
        value = d["ci_lo"] if use_ci else d["mean"]
        if math.isfinite(value) and value > 0:
            better.append(name)
    what = "95% CI of the delta above 0" if use_ci else "mean delta above 0"
    if better:
        return GateCheck("improvement", "*", True, f"{what} for {', '.join(better)}")
    return GateCheck("improvement", "*", False, f"no trained reward has its {what}")


def _pareto_check(
    trained: Mapping[str, Mapping[str, Any]], champion: Mapping[str, float] | None, champion_label: str
) -> GateCheck:
    if not champion:
        return GateCheck("pareto", "*", True, champion_label or "no champion yet")
    names = [n for n in trained if n in champion and math.isfinite(float(champion[n]))]
    if not names:
        return GateCheck("pareto", "*", True, f"champion {champion_label} shares no trained reward; skipped")
    mine = np.array([trained[n]["adapter"]["mean"] for n in names], dtype=np.float64)  # [K]
    theirs = np.array([float(champion[n]) for n in names], dtype=np.float64)  # [K]
    if dominates(theirs, mine):
        return GateCheck(
            "pareto", "*", False, f"dominated by champion {champion_label} on {', '.join(names)}"
        )
    return GateCheck("pareto", "*", True, f"not dominated by champion {champion_label} on {', '.join(names)}")


def evaluate_gate(
    summary: Mapping[str, Any],
    gate: GateConfig,
    champion: Mapping[str, float] | None = None,
    champion_label: str = "",
) -> GateResult:
    """Apply the gate to an evaluation summary.

    `summary["rewards"][name]` holds `held_out`, `base_std`, `adapter.mean` and `delta.{mean, ci_lo,
    ci_hi, n}`; `summary["monitors"][name]` holds `relative_shift`. `champion` maps reward name -> the
    champion's adapter mean (None: no champion yet, or none measured comparably; `champion_label`
    then says which).
    """
    rewards: Mapping[str, Mapping[str, Any]] = summary["rewards"]
    trained = {n: s for n, s in rewards.items() if not s["held_out"]}
    held_out = {n: s for n, s in rewards.items() if s["held_out"]}
    checks = [_drop_check("regression", n, s, gate.max_regression) for n, s in trained.items()]
    checks.append(_improvement_check(trained, gate.min_improvement_ci))
    checks += [_drop_check("held_out", n, s, gate.max_held_out_regression) for n, s in held_out.items()]
    for name, m in summary.get("monitors", {}).items():
        shift = float(m["relative_shift"])
        ok = shift <= gate.max_monitor_shift
        checks.append(
            GateCheck(
                "monitor", name, ok, f"relative shift {shift:.3g} vs allowed {gate.max_monitor_shift:g}"
            )
        )
    if gate.require_not_dominated:
        checks.append(_pareto_check(trained, champion, champion_label))
    return GateResult(passed=all(c.passed for c in checks), checks=checks)
