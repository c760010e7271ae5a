"""MLflow model registry backend: embedded sqlite under the output directory, or a tracking server.

Needs only `mlflow-skinny` + SQLAlchemy + alembic (the `mlflow` extra): the client, the sqlite
tracking/registry store and local artifact storage are all in the skinny package (checked with
MLflow 3.17). Each registration is an MLflow run that logs the adapter files as artifacts
(`adapter/`), the evaluation files (`eval/`) and every metric; the model version is created with
`MlflowClient.create_model_version(source=<run artifact URI>/adapter)`, because MLflow 3 refuses
`register_model("runs:/<id>/<plain dir>")` (docs/library-notes.md).
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from marble.errors import RegistryError
from marble.registry.base import TAG_KEY, NewVersion, RegisteredVersion
from marble.urls import redact_text, redact_url

log = logging.getLogger(__name__)

DB_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
LOCK_FILE = ".registry.lock"
MAX_TAG_CHARS = 4000
"""MLflow caps model version tag values (5000 chars in the sqlite store); longer values are cut."""


def _import_mlflow():
    try:
        import mlflow  # noqa: F401
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
    except ImportError as exc:
        raise RegistryError(
            "registry.kind=mlflow needs the MLflow client: pip install 'marble[mlflow]' "
            f"(mlflow-skinny, sqlalchemy, alembic); import failed: {exc}"
        ) from None
    return MlflowClient, MlflowException


class MlflowRegistry:
    """`Registry` on MLflow. `tracking_uri=None` = embedded sqlite store in `store_dir`."""

    backend = "mlflow"

    def __init__(self, model_name: str, store_dir: Path, tracking_uri: str | None = None) -> None:
        self.model_name = model_name
        self.store_dir = Path(store_dir).resolve()
        if tracking_uri is not None and tracking_uri.startswith("sqlite:///"):
            # A sqlite file elsewhere (e.g. on the pipeline's cache volume, so the champion survives
            # from run to run): still embedded; artifacts and the lock go beside the database file.
            self.store_dir = Path(tracking_uri[len("sqlite:///") :]).resolve().parent
        self.embedded = tracking_uri is None or tracking_uri.startswith("sqlite:///")
        if self.embedded:
            self.store_dir.mkdir(parents=True, exist_ok=True)
            tracking_uri = tracking_uri or f"sqlite:///{self.store_dir / DB_FILE}"
        self.tracking_uri: str = tracking_uri
        self._client = None

    def __repr__(self) -> str:
        return f"MlflowRegistry(model={self.model_name!r}, uri={redact_url(self.tracking_uri)!r})"

    # ---- plumbing
    @property
    def client(self):
        """The MlflowClient, created on first use (creating it may migrate the sqlite schema)."""
        if self._client is None:
            client_cls, _ = _import_mlflow()
            try:
                self._client = client_cls(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
            except Exception as exc:
                raise RegistryError(
                    f"cannot open the MLflow store {redact_url(self.tracking_uri)}: {redact_text(str(exc))}"
                ) from exc
        return self._client

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        """Run one MLflow call; MLflow's own errors become RegistryErrors that name the store."""
        _, mlflow_exc = _import_mlflow()
        try:
            return fn(*args, **kwargs)
        except mlflow_exc as exc:
            raise RegistryError(
                f"MLflow ({redact_url(self.tracking_uri)}) refused to {what}: {redact_text(str(exc))}"
            ) from exc

    def _to_record(self, mv) -> RegisteredVersion:
        return RegisteredVersion(
            name=mv.name,
            version=str(mv.version),
            source=mv.source,
            tags=dict(mv.tags or {}),
            aliases=list(getattr(mv, "aliases", []) or []),
        )

    def _experiment_id(self) -> str:
        exp = self._call("read the experiment", self.client.get_experiment_by_name, self.model_name)
        if exp is not None:
            return exp.experiment_id
        location = (self.store_dir / ARTIFACTS_DIR).as_uri() if self.embedded else None
        return self._call("create the experiment", self.client.create_experiment, self.model_name, location)

    def _ensure_model(self) -> None:
        _, mlflow_exc = _import_mlflow()
        try:
            self.client.get_registered_model(self.model_name)
        except mlflow_exc:
            self._call("create the registered model", self.client.create_registered_model, self.model_name)

    # ---- Registry protocol
    def lock(self) -> AbstractContextManager[object]:
        if not self.embedded:
            # A shared server serialises writes itself; races are resolved after the fact (register.py).
            return nullcontext()
        from filelock import FileLock

        return FileLock(str(self.store_dir / LOCK_FILE), timeout=600)

    def find_versions(self, key: str) -> list[RegisteredVersion]:
        _, mlflow_exc = _import_mlflow()
        query = f"name = '{self.model_name}' and tags.`{TAG_KEY}` = '{key}'"
        try:
            found = self.client.search_model_versions(query)
        except mlflow_exc as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")):
                return []
            raise RegistryError(
                f"MLflow ({redact_url(self.tracking_uri)}) refused to search versions: {redact_text(str(exc))}"
            ) from exc
        return sorted((self._to_record(v) for v in found), key=lambda r: int(r.version))

    def create_version(self, new: NewVersion) -> RegisteredVersion:
        self._ensure_model()
        c = self.client
        run = self._call(
            "start a run", c.create_run, self._experiment_id(), tags={TAG_KEY: new.key}, run_name=new.key[:12]
        )
        run_id = run.info.run_id
        try:
            self._call("log the adapter", c.log_artifacts, run_id, str(new.adapter_dir), "adapter")
            for f in new.extra_files:
                self._call(f"log {f.name}", c.log_artifact, run_id, str(f), "eval")
            for k, v in new.metrics.items():
                self._call(f"log metric {k}", c.log_metric, run_id, k, float(v))
            for k, v in new.tags.items():
                self._call(f"tag the run with {k}", c.set_tag, run_id, k, v[:MAX_TAG_CHARS])
            artifact_uri = self._call("read the run", c.get_run, run_id).info.artifact_uri
            all_tags = {k: v[:MAX_TAG_CHARS] for k, v in {**new.tags, TAG_KEY: new.key}.items()}
            mv = self._call(
                "create a model version",
                c.create_model_version,
                self.model_name,
                source=f"{artifact_uri}/adapter",
                run_id=run_id,
                tags=all_tags,
                description=f"marble LoRA adapter {new.key}",
            )
        except BaseException:
            self._call("mark the run failed", c.set_terminated, run_id, "FAILED")
            raise
        self._call("finish the run", c.set_terminated, run_id, "FINISHED")
        log.info("registered %s version %s (run %s)", self.model_name, mv.version, run_id)
        return self._to_record(mv)

    def delete_version(self, version: str) -> None:
        self._call(f"delete version {version}", self.client.delete_model_version, self.model_name, version)

    def get_alias(self, alias: str) -> RegisteredVersion | None:
        _, mlflow_exc = _import_mlflow()
        try:
            mv = self.client.get_model_version_by_alias(self.model_name, alias)
        except mlflow_exc:
            return None  # no such model or alias yet
        return self._to_record(mv)

    def set_alias(self, alias: str, version: str) -> None:
        self._call(
            f"set alias {alias}", self.client.set_registered_model_alias, self.model_name, alias, version
        )

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self._call(
                f"tag version {version}", self.client.set_model_version_tag, self.model_name, version, k, v
            )

    def download(self, version: RegisteredVersion, dst: Path) -> Path:
        import mlflow.artifacts

        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        path = self._call(
            f"download version {version.version}",
            mlflow.artifacts.download_artifacts,
            artifact_uri=version.source,
            dst_path=str(dst),
            tracking_uri=self.tracking_uri,
        )
        return Path(path)
