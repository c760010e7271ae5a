"""An in-memory Kubeflow Pipelines server behind a fake `kfp.Client`.

The fake's methods have the SAME signatures as kfp.Client's (tests/test_pipeline_schedule.py compares
them with `inspect.signature`), return the real `kfp_server_api` response models, and fail as the real
server does: 409 Conflict for a duplicate pipeline or version name, 404 for an unknown id, ValueError
for the client-side argument checks. `server.fail[method] = exc` makes one method raise.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kfp_server_api as api
from kfp_server_api import ApiException

EQUALS = 1


def _matches(obj: Any, filter: str | None) -> bool:  # noqa: A002 - kfp's own argument name
    if not filter:
        return True
    for pred in json.loads(filter)["predicates"]:
        if pred["operation"] != EQUALS or pred["key"] != "display_name":
            raise ApiException(status=400, reason=f"fake server: unsupported predicate {pred}")
        if obj.display_name != pred["stringValue"]:
            return False
    return True


@dataclass
class FakeKfpServer:
    experiments: dict[str, api.V2beta1Experiment] = field(default_factory=dict)
    pipelines: dict[str, api.V2beta1Pipeline] = field(default_factory=dict)
    versions: dict[str, api.V2beta1PipelineVersion] = field(default_factory=dict)
    runs: dict[str, api.V2beta1Run] = field(default_factory=dict)
    recurring_runs: dict[str, api.V2beta1RecurringRun] = field(default_factory=dict)
    calls: list[tuple[str, dict]] = field(default_factory=list)
    fail: dict[str, Exception] = field(default_factory=dict)
    ids: Any = field(default_factory=lambda: itertools.count(1))

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self.ids)}"

    def record(self, method: str, **kwargs) -> None:
        self.calls.append((method, kwargs))
        if method in self.fail:
            raise self.fail.pop(method)

    def active_schedules(self, name: str) -> list[api.V2beta1RecurringRun]:
        return [r for r in self.recurring_runs.values() if r.display_name == name and r.mode == "ENABLE"]


def make_client_class(server: FakeKfpServer) -> type:
    """A kfp.Client stand-in bound to `server` (the CLI creates a new client per command)."""

    class FakeClient:
        def __init__(
            self,
            host: str | None = None,
            client_id: str | None = None,
            namespace: str = "kubeflow",
            other_client_id: str | None = None,
            other_client_secret: str | None = None,
            existing_token: str | None = None,
            cookies: str | None = None,
            proxy: str | None = None,
            ssl_ca_cert: str | None = None,
            kube_context: str | None = None,
            credentials=None,
            ui_host: str | None = None,
            verify_ssl: bool | None = None,
        ) -> None:
            server.record("init", host=host, existing_token=existing_token)
            self.namespace = None if namespace == "kubeflow" else namespace  # kfp: "kubeflow" = not given

        def create_experiment(self, name: str, description: str = None, namespace: str = None):
            namespace = namespace or self.namespace
            server.record("create_experiment", name=name, **({"namespace": namespace} if namespace else {}))
            for exp in server.experiments.values():
                if exp.display_name == name:
                    return exp
            exp = api.V2beta1Experiment(experiment_id=server.new_id("exp"), display_name=name)
            server.experiments[exp.experiment_id] = exp
            return exp

        def get_pipeline_id(self, name: str) -> str | None:
            server.record("get_pipeline_id", name=name)
            found = [p for p in server.pipelines.values() if p.display_name == name]
            if len(found) > 1:
                raise ValueError(
                    f"Multiple pipelines with the name: {name} found, the name needs to be unique."
                )
            return found[0].pipeline_id if found else None

        def upload_pipeline(
            self,
            pipeline_package_path: str,
            pipeline_name: str | None = None,
            description: str | None = None,
            namespace: str | None = None,
        ):
            server.record("upload_pipeline", pipeline_name=pipeline_name, description=description)
            Path(pipeline_package_path).read_bytes()
            if any(p.display_name == pipeline_name for p in server.pipelines.values()):
                raise ApiException(status=409, reason="Conflict")
            pipeline = api.V2beta1Pipeline(
                pipeline_id=server.new_id("pipeline"), display_name=pipeline_name, description=description
            )
            server.pipelines[pipeline.pipeline_id] = pipeline
            self._add_version(pipeline.pipeline_id, pipeline_name, description)
            return pipeline

        def upload_pipeline_version(
            self,
            pipeline_package_path: str,
            pipeline_version_name: str,
            pipeline_id: str | None = None,
            pipeline_name: str | None = None,
            description: str | None = None,
        ):
            server.record(
                "upload_pipeline_version",
                name=pipeline_version_name,
                pipeline_id=pipeline_id,
                description=description,
            )
            if all([pipeline_id, pipeline_name]) or not any([pipeline_id, pipeline_name]):
                raise ValueError("Either pipeline_id or pipeline_name is required.")
            Path(pipeline_package_path).read_bytes()
            pipeline_id = pipeline_id or self.get_pipeline_id(pipeline_name)
            if pipeline_id not in server.pipelines:
                raise ApiException(status=404, reason="Not Found")
            if any(
                v.pipeline_id == pipeline_id and v.display_name == pipeline_version_name
                for v in server.versions.values()
            ):
                raise ApiException(status=409, reason="Conflict")
            return self._add_version(pipeline_id, pipeline_version_name, description)

        def _add_version(self, pipeline_id: str, name: str, description: str | None):
            version = api.V2beta1PipelineVersion(
                pipeline_id=pipeline_id,
                pipeline_version_id=server.new_id("version"),
                display_name=name,
                description=description,
            )
            server.versions[version.pipeline_version_id] = version
            return version

        def list_pipeline_versions(
            self,
            pipeline_id: str,
            page_token: str = "",
            page_size: int = 10,
            sort_by: str = "",
            filter: str | None = None,  # noqa: A002
        ):
            server.record("list_pipeline_versions", pipeline_id=pipeline_id, filter=filter)
            found = [
                v for v in server.versions.values() if v.pipeline_id == pipeline_id and _matches(v, filter)
            ]
            # The API leaves an empty list out of its JSON: the generated model then holds None.
            return api.V2beta1ListPipelineVersionsResponse(
                pipeline_versions=found or None, total_size=len(found)
            )

        def get_pipeline_version(self, pipeline_id: str, pipeline_version_id: str):
            server.record(
                "get_pipeline_version", pipeline_id=pipeline_id, pipeline_version_id=pipeline_version_id
            )
            version = server.versions.get(pipeline_version_id)
            if version is None or version.pipeline_id != pipeline_id:
                raise ApiException(status=404, reason="Not Found")
            return version

        def _check_job(self, pipeline_package_path, pipeline_id, version_id) -> None:
            if (pipeline_package_path is not None) == (pipeline_id is not None or version_id is not None):
                raise ValueError(
                    "Must specify either `pipeline_pacakge_path` or both `pipeline_id` and `version_id`."
                )
            if (pipeline_id is None) != (version_id is None):
                raise ValueError("To run a pipeline from an existing template, both are required.")
            if version_id is not None and server.versions.get(
                version_id, api.V2beta1PipelineVersion()
            ).pipeline_id != (pipeline_id):
                raise ApiException(status=404, reason="Not Found")

        def run_pipeline(
            self,
            experiment_id: str,
            job_name: str,
            pipeline_package_path: str | None = None,
            params: dict[str, Any] | None = None,
            pipeline_id: str | None = None,
            version_id: str | None = None,
            pipeline_root: str | None = None,
            enable_caching: bool | None = None,
            cache_key: str | None = None,
            service_account: str | None = None,
        ):
            server.record(
                "run_pipeline",
                experiment_id=experiment_id,
                job_name=job_name,
                params=params,
                pipeline_id=pipeline_id,
                version_id=version_id,
            )
            self._check_job(pipeline_package_path, pipeline_id, version_id)
            run = api.V2beta1Run(
                run_id=server.new_id("run"), display_name=job_name, experiment_id=experiment_id
            )
            server.runs[run.run_id] = run
            return run

        def list_recurring_runs(
            self,
            page_token: str = "",
            page_size: int = 10,
            sort_by: str = "",
            experiment_id: str | None = None,
            namespace: str | None = None,
            filter: str | None = None,  # noqa: A002
        ):
            server.record("list_recurring_runs", experiment_id=experiment_id, filter=filter)
            found = [
                r
                for r in server.recurring_runs.values()
                if (experiment_id is None or r.experiment_id == experiment_id) and _matches(r, filter)
            ]
            return api.V2beta1ListRecurringRunsResponse(recurring_runs=found or None, total_size=len(found))

        def create_recurring_run(
            self,
            experiment_id: str,
            job_name: str,
            description: str | None = None,
            start_time: str | None = None,
            end_time: str | None = None,
            interval_second: int | None = None,
            cron_expression: str | None = None,
            max_concurrency: int | None = 1,
            no_catchup: bool | None = None,
            params: dict | None = None,
            pipeline_package_path: str | None = None,
            pipeline_id: str | None = None,
            version_id: str | None = None,
            enabled: bool = True,
            pipeline_root: str | None = None,
            enable_caching: bool | None = None,
            cache_key: str | None = None,
            service_account: str | None = None,
        ):
            server.record(
                "create_recurring_run",
                experiment_id=experiment_id,
                job_name=job_name,
                description=description,
                cron_expression=cron_expression,
                max_concurrency=max_concurrency,
                no_catchup=no_catchup,
                params=params,
                pipeline_id=pipeline_id,
                version_id=version_id,
                enabled=enabled,
            )
            self._check_job(pipeline_package_path, pipeline_id, version_id)
            if experiment_id not in server.experiments:
                raise ApiException(status=404, reason="Not Found")
            run = api.V2beta1RecurringRun(
                recurring_run_id=server.new_id("recurring"),
                display_name=job_name,
                description=description,
                experiment_id=experiment_id,
                max_concurrency=str(max_concurrency),
                no_catchup=no_catchup,
                mode="ENABLE" if enabled else "DISABLE",
                trigger=api.V2beta1Trigger(cron_schedule=api.V2beta1CronSchedule(cron=cron_expression)),
                runtime_config=api.V2beta1RuntimeConfig(parameters=params),
                pipeline_version_reference=api.V2beta1PipelineVersionReference(
                    pipeline_id=pipeline_id, pipeline_version_id=version_id
                ),
            )
            server.recurring_runs[run.recurring_run_id] = run
            return run

        def _recurring(self, recurring_run_id: str) -> api.V2beta1RecurringRun:
            if recurring_run_id not in server.recurring_runs:
                raise ApiException(status=404, reason="Not Found")
            return server.recurring_runs[recurring_run_id]

        def disable_recurring_run(self, recurring_run_id: str) -> dict:
            server.record("disable_recurring_run", recurring_run_id=recurring_run_id)
            self._recurring(recurring_run_id).mode = "DISABLE"
            return {}

        def enable_recurring_run(self, recurring_run_id: str) -> dict:
            server.record("enable_recurring_run", recurring_run_id=recurring_run_id)
            self._recurring(recurring_run_id).mode = "ENABLE"
            return {}

        def delete_recurring_run(self, recurring_run_id: str) -> dict:
            server.record("delete_recurring_run", recurring_run_id=recurring_run_id)
            self._recurring(recurring_run_id)
            del server.recurring_runs[recurring_run_id]
            return {}

    return FakeClient
