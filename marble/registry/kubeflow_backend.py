"""Kubeflow Model Registry backend, through its Python client (`pip install 'marble[kubeflow-registry]'`).

The Model Registry stores metadata and a URI, not files: the adapter must already sit where the
serving side can read it. marble records `MARBLE_ADAPTER_URI` when the pipeline sets it (e.g. the
S3/MinIO URI of the KFP artifact), else the adapter directory's `file://` URI (a shared PVC).

Mapping of the `Registry` protocol onto the Model Registry's objects:
- a version's name is derived from its idempotency key ('<sha256[:16]>-<run id>'), so the server's
  own uniqueness of version names makes a repeated or racing registration return the existing one;
- tags are the version's `custom_properties` (metadata);
- the Model Registry has no aliases: marble keeps them as `alias.<name>` custom properties of the
  registered model, holding the version name.

The client is imported lazily, and built by `client_factory` (tests pass a fake object).
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from marble.errors import RegistryError
from marble.registry.base import TAG_KEY, NewVersion, RegisteredVersion
from marble.urls import redact_url, url_credentials

log = logging.getLogger(__name__)

MODEL_FORMAT = ("diffusers-lora", "1")
"""(model_format_name, model_format_version) recorded on the artifact: a stock diffusers LoRA file."""
ALIAS_PREFIX = "alias."
ADAPTER_URI_ENV = "MARBLE_ADAPTER_URI"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
"""Set in KFP pods: a file with the service-account token, which the model-registry client reads."""


def version_name(key: str) -> str:
    """Deterministic version name of an idempotency key '<sha256>:<run id>'."""
    sha, _, run = key.partition(":")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{sha[:16]}-{run}")[:120]


def default_client_factory(cfg: Any, token: str | None) -> Any:
    """Build the real `model_registry.ModelRegistry` client (it contacts the server at once)."""
    try:
        from model_registry import ModelRegistry
    except ImportError:
        raise RegistryError(
            "registry.kind=kubeflow needs the Kubeflow Model Registry client: "
            "pip install 'marble[kubeflow-registry]' (package `model-registry`)"
        ) from None
    return ModelRegistry(
        cfg.server_address, cfg.port, author=cfg.author, is_secure=cfg.is_secure, user_token=token
    )


class KubeflowModelRegistry:
    """`Registry` on a Kubeflow Model Registry server (config: `marble.config.KubeflowRegistry`)."""

    backend = "kubeflow"

    def __init__(self, cfg: Any, client_factory: Callable[[Any, str | None], Any] | None = None) -> None:
        self.cfg = cfg
        self.model_name = cfg.model_name
        self._factory = client_factory or default_client_factory
        self._client = None

    def __repr__(self) -> str:
        return f"KubeflowModelRegistry(model={self.model_name!r}, server={self._where})"

    @property
    def _where(self) -> str:
        return f"{redact_url(self.cfg.server_address)}:{self.cfg.port}"

    @property
    def client(self) -> Any:
        if self._client is None:
            token = os.environ.get(self.cfg.token_env) or None
            # Inside a KFP pod the client itself reads the service-account token file named by
            # KF_PIPELINES_SA_TOKEN_PATH when no token is passed.
            if self.cfg.is_secure and not token and not os.environ.get(SA_TOKEN_PATH_ENV):
                raise RegistryError(
                    f"registry.token_env: environment variable {self.cfg.token_env} is empty or unset (and "
                    f"{SA_TOKEN_PATH_ENV} is not set); the Kubeflow Model Registry at {self._where} needs a "
                    "token for a secure connection (mount the registry token secret, or set "
                    "registry.is_secure=false for a dev server)"
                )
            try:
                self._client = self._factory(self.cfg, token)
            except RegistryError:
                raise
            except Exception as exc:
                raise RegistryError(
                    f"cannot reach the Kubeflow Model Registry at {self._where} "
                    f"(registry.server_address / registry.port): {type(exc).__name__}: {exc}"
                ) from exc
        return self._client

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryError(
                f"Kubeflow Model Registry at {self._where} failed to {what}: {type(exc).__name__}: {exc}"
            ) from exc

    def _model(self) -> Any:
        return self._call("read the registered model", self.client.get_registered_model, self.model_name)

    def _get(self, name: str) -> Any:
        if self._model() is None:
            return None
        return self._call(f"read version {name}", self.client.get_model_version, self.model_name, name)

    def _record(self, mv: Any) -> RegisteredVersion:
        props = {k: str(v) for k, v in (getattr(mv, "custom_properties", None) or {}).items()}
        rm = self._model()
        rm_props = (getattr(rm, "custom_properties", None) or {}) if rm is not None else {}
        aliases = [
            k[len(ALIAS_PREFIX) :] for k, v in rm_props.items() if k.startswith(ALIAS_PREFIX) and v == mv.name
        ]
        art = self._call("read the artifact", self.client.get_model_artifact, self.model_name, mv.name)
        return RegisteredVersion(
            self.model_name, mv.name, getattr(art, "uri", "") or "", props, sorted(aliases)
        )

    # ---- Registry protocol
    def lock(self) -> AbstractContextManager[object]:
        return nullcontext()  # the server refuses a second version with the same (key-derived) name

    def find_versions(self, key: str) -> list[RegisteredVersion]:
        mv = self._get(version_name(key))
        return [self._record(mv)] if mv is not None else []

    def create_version(self, new: NewVersion) -> RegisteredVersion:
        name = version_name(new.key)
        uri = os.environ.get(ADAPTER_URI_ENV) or Path(new.adapter_dir).resolve().as_uri()
        if url_credentials(uri):  # e.g. a presigned URL: it would be readable by every registry user
            raise RegistryError(
                f"{ADAPTER_URI_ENV}={redact_url(uri)} carries credentials ({', '.join(url_credentials(uri))}); "
                "record a plain storage URI: the serving side reads it with its own credentials"
            )
        metadata: dict[str, Any] = {**new.tags, TAG_KEY: new.key}
        metadata.update({f"metric.{k}": float(v) for k, v in new.metrics.items()})
        # `description` became `version_description` in model-registry 0.3 (the old name still works,
        # with a deprecation warning); use whichever this client has.
        params = inspect.signature(self.client.register_model).parameters
        desc = "version_description" if "version_description" in params else "description"
        try:
            self.client.register_model(
                self.model_name,
                uri,
                model_format_name=MODEL_FORMAT[0],
                model_format_version=MODEL_FORMAT[1],
                version=name,
                author=self.cfg.author,
                metadata=metadata,
                **{desc: f"marble LoRA adapter {new.key}"},
            )
        except Exception as exc:
            if "already exists" not in str(exc):
                raise RegistryError(
                    f"Kubeflow Model Registry at {self._where} refused to register {self.model_name} "
                    f"version {name}: {type(exc).__name__}: {exc}"
                ) from exc
            log.info("version %s already exists (a concurrent registration); reusing it", name)
        mv = self._get(name)
        if mv is None:
            raise RegistryError(
                f"Kubeflow Model Registry at {self._where}: version {name} vanished after registering"
            )
        return self._record(mv)

    def delete_version(self, version: str) -> None:
        # Names are unique server-side, so a lost race never leaves a duplicate to delete.
        raise RegistryError("the Kubeflow Model Registry backend does not delete versions")

    def get_alias(self, alias: str) -> RegisteredVersion | None:
        rm = self._model()
        name = (getattr(rm, "custom_properties", None) or {}).get(ALIAS_PREFIX + alias) if rm else None
        mv = self._get(str(name)) if name else None
        return self._record(mv) if mv is not None else None

    def set_alias(self, alias: str, version: str) -> None:
        rm = self._model()
        if rm is None:
            raise RegistryError(
                f"Kubeflow Model Registry at {self._where}: no registered model {self.model_name}"
            )
        rm.custom_properties = {**(rm.custom_properties or {}), ALIAS_PREFIX + alias: version}
        self._call(f"set alias {alias}", self.client.update, rm)

    def set_tags(self, version: str, tags: dict[str, str]) -> None:
        mv = self._get(version)
        if mv is None:
            raise RegistryError(f"Kubeflow Model Registry at {self._where}: no version {version}")
        mv.custom_properties = {**(mv.custom_properties or {}), **tags}
        self._call(f"tag version {version}", self.client.update, mv)

    def download(self, version: RegisteredVersion, dst: Path) -> Path:
        parsed = urlparse(version.source)
        if parsed.scheme not in ("file", ""):
            raise RegistryError(
                f"version {version.version} is stored at {version.source}; marble fetches only file:// URIs "
                "(a shared volume). Download it with your storage tool, then load it with load_lora_weights."
            )
        src = Path(url2pathname(parsed.path)) if parsed.scheme == "file" else Path(version.source)
        if not src.is_dir():
            raise RegistryError(f"version {version.version}: adapter directory {src} does not exist here")
        dst = Path(dst)
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)  # links kept, so the check refuses them
        return dst
