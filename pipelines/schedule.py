"""Recurring runs of an uploaded pipeline version on a cron schedule, and single cluster runs.

A recurring run is identified by its name (default `<pipeline.name>-<run_name>`) in its experiment:
scheduling the same name again REPLACES it (KFP has no update for recurring runs): the existing ones
are disabled, the new one is created, then the old ones are deleted; if creating fails they are enabled
again, so a failed update never leaves the schedule without a run or with two.

The recurring run never overlaps itself (max concurrency 1) and does not catch up on missed slots
(`no_catchup`): a cluster that was down for a week runs once, not seven times. `--dry-run` prints the
request without contacting a server.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from marble.config import MarbleConfig
from pipelines.kfp_server import (
    ClusterError,
    PipelineVersion,
    check_host,
    connect,
    display_name_filter,
    in_namespace,
    resolve_version,
    spec_sha256,
    start_run,
    version_name,
)

log = logging.getLogger(__name__)

CRON_FIELDS = ("second", "minute", "hour", "day of month", "month", "day of week")
__all__ = ["ClusterError", "check_cron", "build_request", "schedule_recurring_run", "submit_run"]


@dataclass(frozen=True)
class RecurringRunRequest:
    """What `create_recurring_run` sends (the pipeline by version name; its spec summarised by hash)."""

    host: str | None
    namespace: str | None
    experiment: str
    job_name: str
    description: str
    cron: str
    max_concurrency: int
    no_catchup: bool
    enabled: bool
    params: dict[str, Any]
    pipeline_version: str
    pipeline_sha256: str

    def to_json(self) -> str:
        body = asdict(self)
        # The same fields as the v2beta1 RecurringRun body the kfp client builds.
        body["trigger"] = {"cron_schedule": {"cron": body.pop("cron")}}
        body["runtime_config"] = {"parameters": body.pop("params")}
        body["mode"] = "ENABLE" if body.pop("enabled") else "DISABLE"
        body["pipeline_spec"] = f"compiled marble pipeline, sha256 {body.pop('pipeline_sha256')}"
        return json.dumps(body, indent=2, sort_keys=True)


def check_cron(expr: str) -> str:
    """KFP cron has SIX fields (seconds first): '0 0 3 * * 0' is Sundays at 03:00."""
    fields = expr.split()
    if len(fields) != len(CRON_FIELDS):
        raise ClusterError(
            f"cron {expr!r} has {len(fields)} fields; Kubeflow expects 6 ({', '.join(CRON_FIELDS)}), "
            "e.g. '0 0 3 * * 0' for Sundays at 03:00"
        )
    return " ".join(fields)


def require_pushed_images() -> None:
    from pipelines.images import placeholder_images

    if placeholder_images():
        raise ClusterError(
            f"pipelines/images.py still holds placeholder digests for {', '.join(placeholder_images())}: "
            "run `make images` (build, push, pin) before sending the pipeline to a cluster"
        )


def build_request(
    cfg: MarbleConfig,
    *,
    host: str | None,
    experiment: str,
    cron: str | None,
    package: Path,
    params: dict[str, Any] | None = None,
    version: str | None = None,
    name: str | None = None,
    namespace: str | None = None,
) -> RecurringRunRequest:
    """The recurring run for `cfg` (run parameters checked as the run's first task will check them)."""
    from pipelines.marble_pipeline import check_arguments, pipeline_arguments

    cron = check_cron(cron or cfg.pipeline.schedule_cron)
    arguments = pipeline_arguments(cfg, params)
    check_arguments(cfg, arguments)
    return RecurringRunRequest(
        host=check_host(host),
        namespace=namespace,
        experiment=experiment,
        job_name=name or f"{cfg.pipeline.name}-{cfg.run_name}",
        description=f"marble {cfg.run_name} (config {cfg.config_hash()}), cron '{cron}'",
        cron=cron,
        max_concurrency=1,
        no_catchup=True,
        enabled=True,
        params=arguments,
        pipeline_version=version or version_name(cfg),
        pipeline_sha256=spec_sha256(package),
    )


def schedule_recurring_run(
    client, request: RecurringRunRequest, version: PipelineVersion
) -> tuple[str, list[str]]:
    """Create the recurring run of `version`, replacing those of the same name in the experiment.

    Returns (new recurring run id, ids of the replaced ones).
    """
    try:
        experiment_id = client.create_experiment(
            name=request.experiment, namespace=request.namespace
        ).experiment_id
        listed = client.list_recurring_runs(
            experiment_id=experiment_id, filter=display_name_filter(request.job_name), page_size=100
        ).recurring_runs
        old = [r.recurring_run_id for r in listed or [] if r.display_name == request.job_name]
        for rid in old:
            client.disable_recurring_run(rid)
    except Exception as exc:
        raise ClusterError(
            f"{request.host}: preparing recurring run {request.job_name!r} failed"
            f"{in_namespace(request.namespace)}: {exc}"
        ) from None
    try:
        created = client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=request.job_name,
            description=request.description,
            cron_expression=request.cron,
            max_concurrency=request.max_concurrency,
            no_catchup=request.no_catchup,
            enabled=request.enabled,
            params=request.params,
            pipeline_id=version.pipeline_id,
            version_id=version.version_id,
        )
    except Exception as exc:
        _reenable(client, old)
        raise ClusterError(
            f"{request.host}: creating recurring run {request.job_name!r} failed"
            f"{in_namespace(request.namespace)}: {exc}"
        ) from None
    _delete_replaced(client, old)
    return created.recurring_run_id, old


def _reenable(client, ids: list[str]) -> None:
    for rid in ids:
        try:
            client.enable_recurring_run(rid)
        except Exception as exc:  # the create error is the one to report; this one is logged
            log.error("could not re-enable recurring run %s after a failed update: %s", rid, exc)


def _delete_replaced(client, ids: list[str]) -> None:
    for rid in ids:
        try:
            client.delete_recurring_run(rid)
        except Exception as exc:  # disabled already: it never fires again; say so and carry on
            log.warning("replaced recurring run %s is disabled but could not be deleted: %s", rid, exc)


def send_recurring_run(
    request: RecurringRunRequest, cfg: MarbleConfig, package: Path
) -> tuple[str, list[str]]:
    """Connect, find or upload the request's pipeline version, and (re)place the recurring run."""
    client = connect(request.host, request.namespace)
    version = resolve_version(client, cfg, package, _named_version(request, cfg))
    return schedule_recurring_run(client, request, version)


def _named_version(request: RecurringRunRequest, cfg: MarbleConfig) -> str | None:
    """None when the request runs this code and config's own version (uploaded if missing)."""
    return None if request.pipeline_version == version_name(cfg) else request.pipeline_version


def submit_run(
    cfg: MarbleConfig,
    *,
    host: str,
    experiment: str,
    params: dict[str, Any] | None = None,
    version: str | None = None,
    namespace: str | None = None,
    lock=None,
) -> tuple[str, PipelineVersion]:
    """Start one run of an uploaded version (this code, config and model lock's, uploaded if needed, or
    `version`)."""
    import tempfile

    from pipelines.marble_pipeline import check_arguments, compile_pipeline, pipeline_arguments

    arguments = pipeline_arguments(cfg, params)
    check_arguments(cfg, arguments)
    require_pushed_images()
    client = connect(host, namespace)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(cfg, Path(tmp) / "marble_pipeline.yaml", lock=lock)
        resolved = resolve_version(client, cfg, package, version)
    return start_run(client, cfg, resolved, experiment, arguments, namespace), resolved
