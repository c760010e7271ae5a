"""Talk to a Kubeflow Pipelines endpoint with `kfp.Client`: versioned uploads and single runs.

A pipeline is uploaded once under `pipeline.name`; every upload after that is a new VERSION named by
the git commit and the config hash (`version_name`), so the KFP UI lists which code and which config
each version runs, and a run or a recurring run names the exact version it uses. Uploading the same
commit and config again finds the existing version instead of adding a duplicate. Each version's
description carries the sha256 of its compiled spec: a version name that already exists with another
spec (uncommitted changes) is refused rather than silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marble.config import MarbleConfig
from marble.errors import MarbleError
from marble.urls import redact_text, url_credentials

log = logging.getLogger(__name__)

HOST_ENV = "KF_PIPELINES_ENDPOINT"
"""The endpoint variable the kfp client itself reads; the default of `--host`."""
NAMESPACE_ENV = "KFP_NAMESPACE"
"""Default of `--namespace`. Multi-user Kubeflow refuses runs and experiments without the profile's
namespace; the kfp client reads no namespace variable (only its context file, or a pod's own
namespace)."""
TOKEN_ENV = "KFP_TOKEN"
"""Bearer token for an endpoint behind authentication, read from the environment (never an argument:
arguments end up in shell history and process lists). In-cluster, kfp finds the projected service
account token by itself (KF_PIPELINES_SA_TOKEN_PATH)."""
FILTER_EQUALS = 1
"""`EQUALS` of the KFP API's filter predicates (kfp.client.client._FILTER_OPERATIONS)."""


class ClusterError(MarbleError):
    """The KFP endpoint could not be reached, refused the request, or the images are not pushed yet."""


@dataclass(frozen=True)
class PipelineVersion:
    """An uploaded version of the pipeline, as runs and recurring runs refer to it."""

    pipeline_id: str
    version_id: str
    name: str
    created: bool


def connect(host: str | None, namespace: str | None = None):
    """A `kfp.Client` for `host` (bearer token from KFP_TOKEN when set) acting in the profile
    `namespace` (kfp's "kubeflow" default means none given)."""
    import kfp

    if not host:
        raise ClusterError(f"no KFP endpoint: pass --host https://<kubeflow>/pipeline (or set {HOST_ENV})")
    check_host(host)
    try:
        return kfp.Client(
            host=host, existing_token=os.environ.get(TOKEN_ENV) or None, namespace=namespace or "kubeflow"
        )
    except Exception as exc:  # the client raises many transport types; the message is what matters
        raise ClusterError(f"cannot connect to the KFP endpoint {host}: {redact_text(str(exc))}") from None


def check_host(host: str | None) -> str | None:
    """`host` if it carries no credentials (they would land in shell history, logs and requests)."""
    if host and url_credentials(host):
        raise ClusterError(
            f"--host {redact_text(host)} carries credentials ({', '.join(url_credentials(host))}); "
            f"put the token in the environment variable {TOKEN_ENV} instead"
        )
    return host


def display_name_filter(name: str) -> str:
    """A KFP list filter selecting objects whose display name is `name`."""
    return json.dumps(
        {"predicates": [{"operation": FILTER_EQUALS, "key": "display_name", "stringValue": name}]}
    )


def version_name(cfg: MarbleConfig) -> str:
    """'<git commit, 12 hex>-<config hash>' ('-dirty' after the commit for uncommitted changes)."""
    from marble.eval.lineage import git_commit

    commit = git_commit()
    head, dirty = commit.removesuffix("+dirty"), commit.endswith("+dirty")
    return f"{head[:12]}{'-dirty' if dirty else ''}-{cfg.config_hash()}"


def spec_sha256(package: Path) -> str:
    return hashlib.sha256(Path(package).read_bytes()).hexdigest()


def _describe(cfg: MarbleConfig, package: Path) -> str:
    return f"marble {cfg.run_name}, config {cfg.config_hash()}, spec sha256 {spec_sha256(package)}"


def find_version(client, pipeline_name: str, name: str) -> PipelineVersion | None:
    """The uploaded version `name` of pipeline `pipeline_name`, or None."""
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        return None
    found = client.list_pipeline_versions(pipeline_id, filter=display_name_filter(name)).pipeline_versions
    if not found:
        return None
    return PipelineVersion(pipeline_id, found[0].pipeline_version_id, name, created=False)


def upload_version(client, cfg: MarbleConfig, package: Path, name: str | None = None) -> PipelineVersion:
    """Create the pipeline (first upload) and its version `name` (default `version_name(cfg)`), or find
    that version when this exact spec was uploaded before."""
    name = name or version_name(cfg)
    pipeline_name = cfg.pipeline.name
    description = _describe(cfg, package)
    try:
        existing = find_version(client, pipeline_name, name)
        if existing is not None:
            return _same_spec(client, existing, package)
        pipeline_id = client.get_pipeline_id(pipeline_name)
        if pipeline_id is None:
            # KFP stores the first upload as the pipeline's initial version, named like the pipeline.
            pipeline_id = client.upload_pipeline(
                str(package), pipeline_name=pipeline_name, description=description
            ).pipeline_id
        version = client.upload_pipeline_version(
            str(package), pipeline_version_name=name, pipeline_id=pipeline_id, description=description
        )
    except ClusterError:
        raise
    except Exception as exc:
        raise ClusterError(f"uploading pipeline {pipeline_name!r} version {name!r} failed: {exc}") from None
    log.info("uploaded pipeline %s version %s", pipeline_name, name)
    return PipelineVersion(pipeline_id, version.pipeline_version_id, name, created=True)


def _same_spec(client, found: PipelineVersion, package: Path) -> PipelineVersion:
    stored = client.get_pipeline_version(found.pipeline_id, found.version_id).description or ""
    sha = spec_sha256(package)
    if f"spec sha256 {sha}" not in stored:
        raise ClusterError(
            f"pipeline version {found.name!r} already exists with another compiled spec ({stored!r}; this "
            f"one has sha256 {sha}): commit your changes, or name the version with --version-name"
        )
    return found


def resolve_version(client, cfg: MarbleConfig, package: Path, name: str | None) -> PipelineVersion:
    """The version a run uses: `name` if given (it must exist), else this code and config's version,
    uploaded if needed."""
    if name is None:
        return upload_version(client, cfg, package)
    try:
        found = find_version(client, cfg.pipeline.name, name)
    except Exception as exc:
        raise ClusterError(f"looking up pipeline version {name!r} failed: {exc}") from None
    if found is None:
        raise ClusterError(
            f"pipeline {cfg.pipeline.name!r} has no version {name!r}; `marble pipeline upload` creates it"
        )
    return found


def start_run(
    client,
    cfg: MarbleConfig,
    version: PipelineVersion,
    experiment: str,
    arguments: dict[str, Any],
    namespace: str | None = None,
):
    """One run of an uploaded version in the experiment of `namespace`; returns its run id."""
    try:
        experiment_id = client.create_experiment(name=experiment, namespace=namespace).experiment_id
        run = client.run_pipeline(
            experiment_id=experiment_id,
            job_name=f"{cfg.pipeline.name}-{cfg.run_name}",
            params=arguments,
            pipeline_id=version.pipeline_id,
            version_id=version.version_id,
        )
    except Exception as exc:
        raise ClusterError(
            f"starting a run of version {version.name!r} failed{in_namespace(namespace)}: {exc}"
        ) from None
    return run.run_id


def in_namespace(namespace: str | None) -> str:
    """For error messages: where the request went, or that it named no namespace."""
    if namespace:
        return f" in namespace {namespace}"
    return f" (no namespace given: multi-user Kubeflow needs --namespace or {NAMESPACE_ENV})"
