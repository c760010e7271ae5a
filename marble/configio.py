"""Reading, overriding, validating and writing `MarbleConfig` files.

Errors are `ConfigError`s whose message names the file, the field path and the bad value, so the CLI
can print them without a traceback.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from marble.config import MarbleConfig
from marble.shipped import shipped_config, shipped_config_names
from marble.urls import redact_text


class ConfigError(ValueError):
    """A user error in a config file or override (printed without traceback by the CLI)."""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config ({err.error_count()} error{'s' if err.error_count() > 1 else ''})"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        shown = repr(redact_text(value) if isinstance(value, str) else value)
        shown = shown if not isinstance(value, dict) else "{...}"
        if len(shown) > 120:
            shown = shown[:117] + "..."
        if e["type"] == "extra_forbidden":
            lines.append(
                f"  {path}: unknown key (value {shown}); check the spelling against docs/config-schema.json"
            )
        elif e["type"] in ("value_error", "assertion_error") and not e["loc"]:
            lines.append(f"  {msg}")
        else:
            lines.append(f"  {path}: {msg} (got {shown})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key path")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from None
    # YAML reads 1e-4 as a string (no dot); users mean the number.
    if isinstance(value, str) and any(c in value.lower() for c in ".e"):
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {item!r}: {where} is not an index of a list of {len(node)}")
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise ConfigError(f"--set {item!r}: {where} is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(
                    f"--set {item!r}: {'.'.join(path)} is not an index of a list of {len(node)}"
                )
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {item!r}: {'.'.join(path[:-1])} is a value, not a section")
    return data


def resolve_config_path(path: str | Path) -> Path:
    """`path` itself when it is a file, else the shipped config of that name (`tiny`, `sd35m-marble`)."""
    if Path(path).is_file():
        return Path(path)
    shipped = shipped_config(str(path))
    if shipped is None:
        names = ", ".join(shipped_config_names())
        raise ConfigError(f"{path}: config file not found (shipped configs, usable by name: {names})")
    return shipped


def read_config_dict(path: str | Path) -> dict[str, Any]:
    path = resolve_config_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def validate_config(data: dict[str, Any], source: str = "<config>") -> MarbleConfig:
    try:
        return MarbleConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> MarbleConfig:
    data = apply_overrides(read_config_dict(path), overrides or [])
    source = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    return validate_config(data, source)


def config_to_yaml(cfg: MarbleConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=110)
