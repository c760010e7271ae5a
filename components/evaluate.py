"""Component for stage 4: base vs. adapter on held-out prompts, report and metrics (`marble.stages.evaluate`)."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components._factory import make_component


def evaluate(
    config: dict,
    prompts: Input[Dataset],
    adapter: Input[Model],
    reward_cache_dir: str,
    reward_cache_sha256: str,
    model_lock: dict,
    model_lock_sha256: str,
    train_dir: str,
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    report_html: Output[HTML],
    report_md: Output[Markdown],
):
    """`evaluation` holds everything the stage wrote (metrics.json, report, plots); the report and the
    flattened metrics are also published as Kubeflow HTML / Markdown / Metrics artifacts for the UI."""
    import shutil
    from pathlib import Path

    from marble import stages
    from marble.config import MarbleConfig
    from marble.eval.contract import EvalSummary
    from marble.model_cache import lock_from_parameters

    cfg = MarbleConfig.model_validate(config)
    lock = lock_from_parameters(model_lock, model_lock_sha256)
    metrics_path = Path(
        stages.evaluate(
            cfg,
            Path(prompts.path),
            Path(adapter.path),
            Path(evaluation.path),
            reward_cache=reward_cache_dir or None,
            lock=lock,
            reward_cache_sha256=reward_cache_sha256 or None,
            train_dir=train_dir if train_dir and Path(train_dir).exists() else None,
        )
    )
    for name, value in EvalSummary.load(metrics_path.parent / "eval.json").flat_metrics().items():
        if value is not None:  # Kubeflow metrics are finite numbers; a missing score stays in eval.json
            metrics.log_metric(name, value)
    shutil.copyfile(metrics_path.parent / "report.html", report_html.path)
    shutil.copyfile(metrics_path.parent / "report.md", report_md.path)
    evaluation.metadata["config_hash"] = cfg.config_hash()


def build(containerized: bool = False):
    return make_component(evaluate, role="cuda", containerized=containerized)


component = build()
