"""Component for the promotion gate: the decision the pipeline branches on (`marble.stages.gate`).

Its `decision` output ('champion' or 'candidate') is the condition of the pipeline's `dsl.If`: the
run view's graph shows which way a run went. Nothing is registered here.
"""

from typing import NamedTuple

from kfp.dsl import Artifact, Input, Markdown, Metrics, Model, Output

from components._factory import make_component


def gate(
    config: dict,
    work_root: str,
    adapter: Input[Model],
    evaluation: Input[Artifact],
    gate_decision: Output[Artifact],
    gate_report: Output[Markdown],
    metrics: Output[Metrics],
) -> NamedTuple("Outputs", [("decision", str)]):
    """`gate_decision` holds gate.json (every check); `gate_report` shows them as a table. The champion
    is read from the registry the branches register in (an embedded store in `<work_root>/registry`)."""
    from collections import namedtuple
    from pathlib import Path

    from marble import stages
    from marble.config import MarbleConfig
    from marble.runview import gate_markdown, gate_metrics

    cfg = MarbleConfig.model_validate(config)
    store = Path(work_root) / "registry" if work_root else None
    promotion = stages.Promotion(cfg, Path(adapter.path), Path(evaluation.path), registry_dir=store)
    decision = stages.gate(promotion, Path(gate_decision.path))
    Path(gate_report.path).write_text(gate_markdown(decision), encoding="utf-8")
    for name, value in gate_metrics(decision).items():
        metrics.log_metric(name, value)
    gate_decision.metadata.update({"decision": decision["decision"], "summary": decision["summary"]})
    return namedtuple("Outputs", ["decision"])(decision["decision"])


def build(containerized: bool = False):
    return make_component(gate, role="cpu", containerized=containerized)


component = build()
