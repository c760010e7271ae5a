"""Send the pipeline to a Kubeflow Pipelines endpoint: one run, or a recurring run on a cron schedule.

The recurring run never overlaps itself (max concurrency 1) and does not catch up on missed slots
(`no_catchup`): a cluster that was down for a week runs once, not seven times. `--dry-run` prints the
request without contacting a server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from marble.config import MarbleConfig
from marble.errors import MarbleError

log = logging.getLogger(__name__)

CRON_FIELDS = ("second", "minute", "hour", "day of month", "month", "day of week")


class ClusterError(MarbleError):
    """The KFP endpoint could not be reached, refused the request, or the images are not pushed yet."""


@dataclass(frozen=True)
class RecurringRunRequest:
    """What `create_recurring_run` sends (the pipeline spec itself is summarised by path and hash)."""

    host: str | None
    experiment: str
    job_name: str
    description: str
    cron: str
    max_concurrency: int
    no_catchup: bool
    enabled: bool
    params: dict[str, Any]
    pipeline_package: str
    pipeline_sha256: str

    def to_json(self) -> str:
        body = asdict(self)
        # The same fields as the v2beta1 RecurringRun body the kfp client builds.
        body["trigger"] = {"cron_schedule": {"cron": body.pop("cron")}}
        body["runtime_config"] = {"parameters": body.pop("params")}
        body["mode"] = "ENABLE" if body.pop("enabled") else "DISABLE"
        # The spec itself (hundreds of lines) is named by its hash; the file is a temporary one.
        body.pop("pipeline_package")
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
    cfg: MarbleConfig, *, host: str | None, experiment: str, cron: str | None, package: Path
) -> RecurringRunRequest:
    from pipelines.marble_pipeline import pipeline_arguments

    cron = check_cron(cron or cfg.pipeline.schedule_cron)
    return RecurringRunRequest(
        host=host,
        experiment=experiment,
        job_name=f"{cfg.pipeline.name}-{cfg.run_name}",
        description=f"marble {cfg.run_name} (config {cfg.config_hash()}), cron '{cron}'",
        cron=cron,
        max_concurrency=1,
        no_catchup=True,
        enabled=True,
        params=pipeline_arguments(cfg),
        pipeline_package=str(package),
        pipeline_sha256=hashlib.sha256(package.read_bytes()).hexdigest(),
    )


TOKEN_ENV = "KFP_TOKEN"
"""Bearer token for an endpoint behind authentication, read from the environment (never an argument:
arguments end up in shell history and process lists). In-cluster, kfp finds the projected service
account token by itself (KF_PIPELINES_SA_TOKEN_PATH)."""


def _client(host: str | None):
    import os

    import kfp

    if not host:
        raise ClusterError("no KFP endpoint: pass --host https://<kubeflow>/pipeline")
    try:
        return kfp.Client(host=host, existing_token=os.environ.get(TOKEN_ENV) or None)
    except Exception as exc:  # the client raises many transport types; the message is what matters
        raise ClusterError(f"cannot connect to the KFP endpoint {host}: {exc}") from None


def send_recurring_run(request: RecurringRunRequest) -> str:
    """Create the recurring run; returns its id."""
    client = _client(request.host)
    try:
        experiment = client.create_experiment(name=request.experiment)
        run = client.create_recurring_run(
            experiment_id=experiment.experiment_id,
            job_name=request.job_name,
            description=request.description,
            cron_expression=request.cron,
            max_concurrency=request.max_concurrency,
            no_catchup=request.no_catchup,
            enabled=request.enabled,
            params=request.params,
            pipeline_package_path=request.pipeline_package,
        )
    except Exception as exc:
        raise ClusterError(f"{request.host}: creating the recurring run failed: {exc}") from None
    return run.recurring_run_id


def submit_run(cfg: MarbleConfig, *, host: str, experiment: str) -> str:
    """Compile and start one run on the cluster; returns the run id."""
    from pipelines.marble_pipeline import compile_pipeline, pipeline_arguments

    require_pushed_images()
    client = _client(host)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(cfg, Path(tmp) / "marble_pipeline.yaml")
        try:
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=pipeline_arguments(cfg),
                run_name=f"{cfg.pipeline.name}-{cfg.run_name}",
                experiment_name=experiment,
            )
        except Exception as exc:
            raise ClusterError(f"{host}: starting the run failed: {exc}") from None
    return result.run_id
