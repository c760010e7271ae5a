"""The evaluation contract: `eval.json`, one versioned pydantic model.

The evaluate stage writes it; the gate, the register stage, the report and the Kubeflow component read
it through `EvalSummary.load`, so every reader sees the same typed fields and an old or hand-edited file
is refused with its path and the offending field instead of a `KeyError` deep inside a stage.

Scores: each reward reports the score its paper reports (`scale`: "training" when that is the training
score, else the name of the reward's evaluation score, e.g. GenEval's "binary" accuracy or PickScore's
"raw" logit scale) and, for those rewards, the training scale beside it (`training`). JSON has no NaN:
a score that does not exist (a reward that applied to no evaluated prompt) is `null` in the file and
NaN in Python.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from marble.errors import MarbleError
from marble.io import atomic_write_text

SCHEMA_VERSION = 2
"""Version of the `eval.json` layout; a reader refuses any other (re-run `marble evaluate`)."""


class EvalContractError(MarbleError):
    """An `eval.json` that is missing, not JSON, of another schema version, or malformed."""


def _none_as_nan(value: Any) -> Any:
    return math.nan if value is None else value


Score = Annotated[float, BeforeValidator(_none_as_nan)]
"""A float that may be NaN (written as JSON null, read back as NaN)."""


class _Contract(BaseModel):
    # NaN and inf serialise as JSON null (pydantic's `ser_json_inf_nan="null"`).
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")


# ------------------------------------------------------------------------------------------ scores
class Interval(_Contract):
    """A mean with its 95% percentile-bootstrap interval over `n` finite values (NaN when n = 0)."""

    mean: Score
    ci_lo: Score
    ci_hi: Score
    n: int


class ScaleStats(_Contract):
    """Base vs. adapter on one scale of one reward, over the same prompts and seeds."""

    base: Interval
    adapter: Interval
    base_std: Score = Field(description="Std of the base model's scores (the gate's unit).")
    delta: Interval = Field(description="Paired adapter - base over the samples both were scored on.")
    win_rate: Score = Field(description="Share of pairs where the adapter scores higher; ties count 1/2.")


class RewardResult(ScaleStats):
    """One reward: its reported scale at the top level, the training scale beside it where it differs."""

    kind: str
    held_out: bool
    scale: str = Field(
        description="'training' when the reported score is the training score, else the name of the "
        "reward's evaluation score (GenEval 'binary' accuracy, PickScore 'raw' logit scale)."
    )
    training: ScaleStats | None = Field(
        None, description="The same statistics on the training scale; null when `scale` is 'training'."
    )


class MonitorResult(_Contract):
    base: Interval
    adapter: Interval
    relative_shift: Score = Field(description="|adapter - base| / max(|base|, 0.05): what the gate bounds.")


class CompositeScore(_Contract):
    base: Score
    adapter: Score
    rewards: list[str] = Field(description="Rewards in the composite (those scored on any prompt).")


class Composite(_Contract):
    """The paper's composite: mean z-score over rewards of the compared models (population std)."""

    all: CompositeScore
    trained: CompositeScore


class MeanPair(_Contract):
    base: Score
    adapter: Score


class FamilyMeans(_Contract):
    n: int = Field(description="Images of the family.")
    rewards: dict[str, MeanPair] = Field(description="Reported-scale means of the rewards that apply.")


class EvalScores(_Contract):
    """What the promotion gate reads: per-reward results and hacking monitors (and summaries of them)."""

    rewards: dict[str, RewardResult]
    monitors: dict[str, MonitorResult]
    composite: Composite
    by_family: dict[str, FamilyMeans]

    def trained(self) -> dict[str, RewardResult]:
        return {n: r for n, r in self.rewards.items() if not r.held_out}

    def held_out(self) -> dict[str, RewardResult]:
        return {n: r for n, r in self.rewards.items() if r.held_out}


# -------------------------------------------------------------------------------------------- gate
class GateCheck(_Contract):
    """One rule applied to one reward or monitor."""

    rule: Literal["regression", "improvement", "held_out", "monitor", "pareto"]
    subject: str = Field(description="Reward or monitor name ('*' for rules over all rewards).")
    passed: bool
    detail: str


class GateResult(_Contract):
    passed: bool
    checks: list[GateCheck] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _drop_written_summary(cls, data: Any) -> Any:
        # `summary` is written for human readers of eval.json and always recomputed from the checks.
        if isinstance(data, dict) and "summary" in data:
            data = {k: v for k, v in data.items() if k != "summary"}
        return data

    @property
    def failures(self) -> list[GateCheck]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> str:
        """One line: 'passed' or the failing checks."""
        if self.passed:
            return "passed"
        return "failed: " + "; ".join(f"{c.rule}/{c.subject}: {c.detail}" for c in self.failures)

    def to_json_dict(self) -> dict[str, Any]:
        return {**self.model_dump(mode="json"), "summary": self.summary()}


# ----------------------------------------------------------------------------------------- lineage
class ArtifactRef(_Contract):
    """A model repo (or directory) a reward loads, and the revision the config pins (null: unpinned)."""

    id: str
    revision: str | None


class RewardLineage(_Contract):
    kind: str
    held_out: bool
    artifacts: list[ArtifactRef] = Field(description="What the reward loads (none for rule rewards).")


class CachedArtifact(_Contract):
    """One snapshot of the reward cache: the revision it resolved to (an unpinned config is pinned here)."""

    id: str
    requested_revision: str | None = None
    revision: str | None = None
    source: str | None = None
    used_by: list[str] = Field(default_factory=list)
    total_bytes: int | None = None
    num_files: int = 0


class CacheSummary(_Contract):
    format: Any = None
    created_utc: str | None = None
    artifacts: list[CachedArtifact] = Field(default_factory=list)


class RewardModelsLineage(_Contract):
    rewards: dict[str, RewardLineage]
    model_lock_sha256: str | None = Field(
        None, description="sha256 of the model lock the run verified against."
    )
    manifest_sha256: str | None = Field(None, description="sha256 of the reward cache manifest, if any.")
    manifest: CacheSummary | None = None


class Lineage(_Contract):
    """Which code, config, data, adapter and reward models produced the numbers."""

    eval_protocol: str = Field(description="Hash of how the adapter was measured (see marble.eval.lineage).")
    run_name: str
    git_commit: str
    config_hash: str
    base_model: str
    base_model_revision: str | None
    adapter_dir: str
    adapter_sha256: str
    data_hash: str | None
    prompts_manifest_sha256: str | None
    test_jsonl_sha256: str | None
    reward_models: RewardModelsLineage


# ---------------------------------------------------------------------------------------- sampling
class SamplingInfo(_Contract):
    solver: str
    shift: float
    num_steps: int
    guidance_scale: float
    resolution: int
    batch_size: int
    device: str
    dtype: str
    seeds: list[int]
    images_per_prompt: int
    seconds_base: float
    seconds_adapter: float


class AdapterEffect(_Contract):
    max_abs_pixel_diff: float = Field(description="Largest pixel change base -> adapter, on [0, 1].")


# -------------------------------------------------------------------------------------------- root
class EvalSummary(EvalScores):
    """Everything `eval.json` holds."""

    schema_version: Literal[2] = SCHEMA_VERSION
    created: str = Field(description="UTC time of the evaluation, ISO 8601.")
    lineage: Lineage
    sampling: SamplingInfo
    num_prompts: int
    num_images: int
    adapter_effect: AdapterEffect
    gate_preview: GateResult = Field(description="The promotion gate without the champion.")

    def flat_metrics(self) -> dict[str, float | None]:
        """The numbers DVC tracks (`metrics.json`) and the registry tags: slash-namespaced, NaN as None."""
        flat: dict[str, float] = {}
        for name, r in self.rewards.items():
            flat.update(_scale_metrics("", name, r))
            if r.training is not None:
                flat.update(_scale_metrics("training/", name, r.training))
        for name, m in self.monitors.items():
            flat[f"monitor/base/{name}"] = m.base.mean
            flat[f"monitor/adapter/{name}"] = m.adapter.mean
            flat[f"monitor/shift/{name}"] = m.relative_shift
        for label in ("all", "trained"):
            score: CompositeScore = getattr(self.composite, label)
            flat[f"composite/{label}/base"] = score.base
            flat[f"composite/{label}/adapter"] = score.adapter
        flat["gate_preview/passed"] = float(self.gate_preview.passed)
        return {k: (float(v) if math.isfinite(v) else None) for k, v in flat.items()}

    def to_json(self) -> str:
        data = json.loads(self.model_dump_json())  # NaN -> null (`model_dump` would keep NaN)
        data["gate_preview"] = self.gate_preview.to_json_dict()
        return json.dumps(data, indent=2, allow_nan=False) + "\n"

    def write(self, path: Path) -> Path:
        return atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> EvalSummary:
        """Read and validate an `eval.json`; errors name the file and the field."""
        path = Path(path)
        if not path.is_file():
            raise EvalContractError(f"{path}: not found; run `marble evaluate` first")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise EvalContractError(f"{path}: not valid JSON ({exc})") from None
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version != SCHEMA_VERSION:
            raise EvalContractError(
                f"{path}: schema_version {version!r}, this marble reads {SCHEMA_VERSION}; "
                "re-run `marble evaluate` to rewrite it"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "<root>"
            raise EvalContractError(
                f"{path}: {where}: {first['msg']} ({err.error_count()} error(s) in all)"
            ) from None


def _scale_metrics(prefix: str, name: str, s: ScaleStats) -> dict[str, float]:
    return {
        f"{prefix}base/{name}": s.base.mean,
        f"{prefix}adapter/{name}": s.adapter.mean,
        f"{prefix}delta/{name}": s.delta.mean,
        f"{prefix}delta_ci_lo/{name}": s.delta.ci_lo,
        f"{prefix}delta_ci_hi/{name}": s.delta.ci_hi,
        f"{prefix}win_rate/{name}": s.win_rate,
    }
