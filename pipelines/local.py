"""Run the whole pipeline on this machine with Kubeflow's SubprocessRunner (no cluster, no Docker).

Each task runs as a lightweight component in a subprocess of this venv (the project must be installed
in it, as `make setup` does). Kubernetes settings are compiled but ignored locally. Artifacts land under
`<pipeline_root>/<pipeline name>-<timestamp>/<task>/<output>`; `LocalRunOutputs` names them.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marble.config import MarbleConfig
from marble.errors import MarbleError
from pipelines.local_output import quiet_run_output

log = logging.getLogger(__name__)


class LocalRunError(MarbleError):
    """A task of the local pipeline run failed (the last lines of its output, printed above, say why)."""


@dataclass(frozen=True)
class LocalRunOutputs:
    """Where a local run put each stage's outputs."""

    run_dir: Path
    prompts: Path
    reward_cache: Path
    adapter: Path
    evaluation: Path
    report_html: Path
    report_md: Path
    metrics: Path
    registration: Path
    seconds: float
    log: Path | None = None
    decision: str = ""
    """The gate's decision: 'champion' (the promote branch ran) or 'candidate' (record-candidate ran)."""

    def summary(self) -> str:
        rows = [
            ("adapter", self.adapter),
            ("report", self.report_html),
            ("report (markdown)", self.report_md),
            ("metrics", self.metrics),
            (f"registry entry ({self.decision})", self.registration),
            ("prompts", self.prompts),
            ("reward cache", self.reward_cache),
        ]
        if self.log is not None:
            rows.append(("full log", self.log))
        width = max(len(name) for name, _ in rows)
        lines = [f"pipeline finished in {self.seconds:.0f} s; run directory {self.run_dir}"]
        lines += [f"  {name:<{width}}  {path}" for name, path in rows]
        return "\n".join(lines)


BRANCH_TASKS = {"champion": "promote", "candidate": "record-candidate"}
"""The gate's decision -> the task of its branch."""


def default_pipeline_root(cfg: MarbleConfig) -> Path:
    return Path(cfg.output_dir) / "kfp"


def run_local(
    cfg: MarbleConfig,
    pipeline_root: str | Path | None = None,
    params: dict[str, Any] | None = None,
    lock=None,
) -> LocalRunOutputs:
    """Run the pipeline for `cfg` (and its model lock) locally (run parameters from `params` where
    given) and locate the outputs."""
    import kfp.local

    from pipelines.marble_pipeline import build_pipeline, pipeline_arguments

    root = Path(pipeline_root) if pipeline_root else default_pipeline_root(cfg)
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in root.iterdir()}
    kfp.local.init(
        runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True
    )
    pipeline = build_pipeline(cfg, containerized=False, lock=lock)
    log_path = root / "logs" / f"{cfg.pipeline.name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    print(f"full output of the tasks (executor JSON, library logs, warnings): {log_path}", flush=True)
    start = time.perf_counter()
    with quiet_run_output(log_path), warnings.catch_warnings():
        # The pinned images' names do not contain "python"; locally the image is not used at all.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        try:
            pipeline(**pipeline_arguments(cfg, params))
        except RuntimeError as exc:
            plain = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # kfp colours its messages for terminals
            raise LocalRunError(f"local pipeline run failed under {root}: {plain}") from None
    seconds = time.perf_counter() - start
    return locate_outputs(_new_run_dir(root, before, cfg.pipeline.name), seconds, log_path)


def _new_run_dir(root: Path, before: set[str], name: str) -> Path:
    new = sorted(p for p in root.iterdir() if p.is_dir() and p.name not in before and p.name.startswith(name))
    if len(new) != 1:
        raise LocalRunError(f"{root}: expected one new run directory named {name}-<timestamp>, found {new}")
    return new[0]


def locate_outputs(run_dir: Path, seconds: float = 0.0, log: Path | None = None) -> LocalRunOutputs:
    """The artifact paths of one local run directory (task and output names of the pipeline)."""
    evaluation = run_dir / "evaluate" / "evaluation"
    # Exactly one branch of the gate ran: its task holds the registration.
    decision, branch = next(
        ((d, t) for d, t in BRANCH_TASKS.items() if (run_dir / t).is_dir()),
        ("", "promote or record-candidate"),
    )
    outputs = LocalRunOutputs(
        run_dir=run_dir,
        prompts=run_dir / "prepare-prompts" / "prompts",
        reward_cache=run_dir / "cache-reward-models" / "reward_cache",
        adapter=run_dir / "train" / "adapter",
        evaluation=evaluation,
        report_html=run_dir / "evaluate" / "report_html",
        report_md=run_dir / "evaluate" / "report_md",
        metrics=evaluation / "metrics.json",
        registration=run_dir / branch / "registration" / "registration.json",
        seconds=seconds,
        log=log,
        decision=decision,
    )
    missing = [str(p) for p in (outputs.adapter, outputs.metrics, outputs.registration) if not p.exists()]
    if missing:
        raise LocalRunError(f"local run finished but these outputs are missing: {', '.join(missing)}")
    return outputs
