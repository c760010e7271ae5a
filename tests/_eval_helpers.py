"""Hand-made evaluation contracts (`marble.eval.contract`) for the gate, registry and report tests."""

from __future__ import annotations

import math

from marble.eval.contract import (
    AdapterEffect,
    Composite,
    CompositeScore,
    EvalScores,
    EvalSummary,
    GateResult,
    Interval,
    Lineage,
    MonitorResult,
    RewardModelsLineage,
    RewardResult,
    SamplingInfo,
)

NAN = float("nan")


def interval(mean: float, lo: float | None = None, hi: float | None = None, n: int = 10) -> Interval:
    return Interval(mean=mean, ci_lo=mean if lo is None else lo, ci_hi=mean if hi is None else hi, n=n)


def reward(
    delta: float,
    ci: tuple[float, float],
    adapter: float,
    *,
    held_out: bool = False,
    base_std: float = 1.0,
    n: int = 10,
    kind: str = "brightness",
) -> RewardResult:
    """A reward whose paired delta is `delta` with 95% CI `ci`, the adapter's mean `adapter`."""
    base = adapter - delta if math.isfinite(adapter) else NAN
    return RewardResult(
        kind=kind,
        held_out=held_out,
        scale="training",
        base=interval(base, n=n),
        adapter=interval(adapter, n=n),
        base_std=base_std,
        delta=interval(delta, *ci, n=n),
        win_rate=0.5,
    )


def monitor(shift: float) -> MonitorResult:
    return MonitorResult(base=interval(0.2), adapter=interval(0.2 * (1 + shift)), relative_shift=shift)


def scores(rewards: dict[str, RewardResult], monitors: dict[str, float]) -> EvalScores:
    composite = CompositeScore(base=-1.0, adapter=1.0, rewards=list(rewards))
    return EvalScores(
        rewards=rewards,
        monitors={k: monitor(v) for k, v in monitors.items()},
        composite=Composite(all=composite, trained=composite),
        by_family={},
    )


def summary(
    s: EvalScores, *, adapter_sha256: str = "ab" * 32, protocol: str = "p1", run_name: str = "tiny"
) -> EvalSummary:
    """A complete `eval.json` around `s` (lineage, sampling and the gate preview filled in)."""
    from marble.config import GateConfig
    from marble.eval.gate import evaluate_gate

    lineage = Lineage(
        eval_protocol=protocol,
        run_name=run_name,
        git_commit="unknown",
        config_hash="c0ffee",
        base_model="tiny",
        base_model_revision=None,
        adapter_dir="adapter",
        adapter_sha256=adapter_sha256,
        data_hash="da7a",
        prompts_manifest_sha256=None,
        test_jsonl_sha256=None,
        reward_models=RewardModelsLineage(rewards={}),
    )
    sampling = SamplingInfo(
        solver="FlowMatchEulerDiscreteScheduler", shift=3.0, num_steps=8, guidance_scale=1.0, resolution=64,
        batch_size=8, device="cpu", dtype="float32", seeds=[1234], images_per_prompt=1, seconds_base=0.1,
        seconds_adapter=0.1,
    )  # fmt: skip
    gate: GateResult = evaluate_gate(s, GateConfig())
    return EvalSummary(
        **dict(s),
        created="2026-01-01T00:00:00+00:00",
        lineage=lineage,
        sampling=sampling,
        num_prompts=1,
        num_images=1,
        adapter_effect=AdapterEffect(max_abs_pixel_diff=0.1),
        gate_preview=gate,
    )
