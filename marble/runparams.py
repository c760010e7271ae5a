"""Run parameters: the settings people change between runs, as typed Kubeflow pipeline parameters.

`RUN_PARAMETERS` is the one table mapping each parameter to the config field it sets. The pipeline's
signature, its defaults (read from the config it is compiled with), the first task that validates a run
and the CLI's run arguments are all derived from it.

Rules (documented in docs/kubeflow.md):
- a run parameter ALWAYS wins over the same field of the `config` parameter (the advanced override):
  the form a user fills in is what runs. Where the two differ, the validation step says so;
- `balancer_kind` different from the config's balancer kind starts from that kind's preset, then
  `balancer_refresh_every` / `balancer_ema_decay` apply to it (kinds without those fields ignore them,
  with a note);
- `balancer_ema_decay` 0 means no smoothing: it reads the config's null as 0, which is the same
  arithmetic (α = 0·α_prev + 1·α_fresh), and writes 0 only when the value actually changes;
- the `pipeline:` section (Kubernetes placement) is no run parameter: it is fixed when the pipeline is
  compiled, and a `pipeline:` section inside the override is replaced by the compiled one.
"""

from __future__ import annotations

import copy
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from marble.config import MarbleConfig
from marble.configio import ConfigError

KUBERNETES_SECTION = "pipeline"
"""The config section that only places tasks on Kubernetes (compiled into the spec, never a parameter)."""


@dataclass(frozen=True)
class RunParameter:
    """One typed pipeline parameter and the config field it sets (dotted path)."""

    name: str
    field: str
    type: type
    note: str = ""
    null_as: Any = None
    """The parameter value that stands for the field's null (KFP parameters cannot be null)."""

    @property
    def description(self) -> str:
        text = field_description(self.field)
        return f"{text} {self.note}".strip() + f" [config: {self.field}]"


RUN_PARAMETERS: tuple[RunParameter, ...] = (
    RunParameter("run_name", "run_name", str),
    RunParameter("epochs", "train.epochs", int),
    RunParameter("lr", "train.lr", float),
    RunParameter("seed", "train.seed", int),
    RunParameter(
        "balancer_kind",
        "balancer.kind",
        str,
        "How per-reward gradients combine: weighted_sum, equal, gdpo, marble, marble_paper, "
        "marble_full, marble_step, marble_ub, pcgrad, cagrad. A kind other than the config's starts from that kind's preset.",
    ),
    RunParameter("balancer_refresh_every", "balancer.refresh_every", int, "Gram-based kinds only."),
    RunParameter(
        "balancer_ema_decay", "balancer.ema_decay", float, "Gram-based kinds only; 0 = no smoothing.", 0.0
    ),
    RunParameter("sampling_steps", "sampling.num_steps", int),
    RunParameter("group_size", "sampling.group_size", int),
    RunParameter("prompts_per_epoch", "sampling.prompts_per_epoch", int),
    RunParameter("gate_max_regression", "eval.gate.max_regression", float),
    RunParameter("gate_max_held_out_regression", "eval.gate.max_held_out_regression", float),
    RunParameter("gate_max_monitor_shift", "eval.gate.max_monitor_shift", float),
)
RUN_PARAMETER_NAMES = tuple(p.name for p in RUN_PARAMETERS)
_BY_NAME = {p.name: p for p in RUN_PARAMETERS}
_NOT_APPLICABLE = object()


# ----------------------------------------------------------------------------- the config's models
def _union_members(model: type[BaseModel], name: str) -> dict[str, type[BaseModel]]:
    """kind -> model class of a discriminated-union field (e.g. `balancer`); {} for a plain field."""
    members = {}
    for arg in typing.get_args(model.model_fields[name].annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel) and "kind" in arg.model_fields:
            members[arg.model_fields["kind"].default] = arg
    return members


def _node_model(parts: list[str], data: dict[str, Any] | None = None) -> type[BaseModel]:
    """The model class of the config node at `parts` (a union resolved by `data`'s kind, else its default)."""
    model: type[BaseModel] = MarbleConfig
    node = data
    for part in parts:
        info = model.model_fields[part]
        members = _union_members(model, part)
        node = node.get(part) if isinstance(node, dict) else None
        if members:
            default = info.default_factory() if info.default_factory else info.default
            kind = node.get("kind") if isinstance(node, dict) else None
            model = members.get(kind, type(default))
        else:
            model = info.annotation
    return model


def field_description(path: str) -> str:
    """The config schema's description of a dotted field (for a union: its default member's)."""
    *parents, leaf = path.split(".")
    info = _node_model(parents).model_fields[leaf]
    return info.description or ""


# --------------------------------------------------------------------------- reading and writing
def _read(data: dict[str, Any], p: RunParameter) -> Any:
    """The parameter's value in `data` (a config dict): explicit value, else the schema default."""
    *parents, leaf = p.field.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    model = _node_model(parents, data)
    if leaf not in model.model_fields:
        return _NOT_APPLICABLE
    if isinstance(node, dict) and leaf in node:
        value = node[leaf]
    else:
        info = model.model_fields[leaf]
        value = info.default_factory() if info.default_factory else info.default
    return p.null_as if value is None else value


def _write(data: dict[str, Any], p: RunParameter, value: Any) -> None:
    *parents, leaf = p.field.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def run_parameter_values(cfg: MarbleConfig) -> dict[str, Any]:
    """The run parameters of `cfg` (the pipeline's defaults; the CLI's run arguments).

    A field the config's balancer kind lacks takes the default of the marble preset, so the parameter
    still has a typed default.
    """
    data = cfg.model_dump(mode="json")
    values = {}
    for p in RUN_PARAMETERS:
        value = _read(data, p)
        if value is _NOT_APPLICABLE:
            value = _read({}, p)
        values[p.name] = p.type(value)
    return values


# ------------------------------------------------------------------------------ resolving a run
def config_dict(cfg: MarbleConfig) -> dict[str, Any]:
    """`cfg` as a Kubeflow dict parameter: JSON types, nulls left out.

    kfp 2.17 refuses None inside a dict default (protobuf Struct via `to_protobuf_value`), so null fields
    are dropped; that is lossless only when each dropped field's default is null too, which is checked.
    """
    data = cfg.model_dump(mode="json", exclude_none=True)
    if MarbleConfig.model_validate(data) != cfg:
        lost = sorted(_null_paths(cfg.model_dump(mode="json")))
        raise ConfigError(
            f"config: a null value that differs from the field's default cannot travel as a Kubeflow "
            f"parameter (kfp 2.17); set an explicit value instead of null for one of: {', '.join(lost)}"
        )
    return data


def _null_paths(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _null_paths(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _null_paths(v, f"{prefix}.{i}")]
    return [prefix] if node is None else []


def override_parameter(cfg: MarbleConfig) -> dict[str, Any]:
    """The default of the pipeline's `config` parameter: `cfg` without its Kubernetes section."""
    data = config_dict(cfg)
    data.pop(KUBERNETES_SECTION, None)
    return data


def kubernetes_section(cfg: MarbleConfig) -> dict[str, Any]:
    """The compiled-in Kubernetes section that every run's config carries (not a parameter)."""
    return config_dict(cfg).get(KUBERNETES_SECTION, {})


def apply_run_parameters(
    config: dict[str, Any], values: dict[str, Any], kubernetes: dict[str, Any] | None = None
) -> tuple[MarbleConfig, list[str]]:
    """The validated config of a run: the override `config`, the run parameter `values` on top, and the
    compiled `kubernetes` section. Returns it with notes on what the parameters replaced.

    Raises ConfigError naming each bad parameter and its config field (and the override's own errors).
    """
    unknown = sorted(set(values) - set(RUN_PARAMETER_NAMES))
    if unknown:
        raise ConfigError(f"unknown run parameter(s) {unknown}; known: {', '.join(RUN_PARAMETER_NAMES)}")
    data = copy.deepcopy(dict(config))
    notes: list[str] = []
    if kubernetes is not None:
        if data.get(KUBERNETES_SECTION) not in (None, kubernetes):
            notes.append(f"{KUBERNETES_SECTION}: the override's section is replaced by the compiled one")
        data[KUBERNETES_SECTION] = copy.deepcopy(kubernetes)
    kind = values.get("balancer_kind")
    old_kind = _read(data, _BY_NAME["balancer_kind"])
    if kind is not None and kind != old_kind:
        notes.append(f"balancer.kind: {old_kind} -> {kind} (starting from the {kind} preset)")
        data["balancer"] = {"kind": kind}
    for name, value in values.items():
        p = _BY_NAME[name]
        current = _read(data, p)
        if current is _NOT_APPLICABLE:
            if value != _read({}, p):
                kind_now = _read(data, _BY_NAME["balancer_kind"])
                notes.append(f"{p.name}={value!r} does not apply to balancer kind {kind_now!r}; ignored")
        elif value != current:
            if _explicit(data, p):
                notes.append(f"{p.field}: run parameter {p.name}={value!r} replaces the config's {current!r}")
            _write(data, p, value)
    try:
        return MarbleConfig.model_validate(data), notes
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def _explicit(config: dict[str, Any], p: RunParameter) -> bool:
    node: Any = config
    for part in p.field.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _format_errors(err: ValidationError) -> str:
    """One line per error, naming the run parameter behind a field where there is one."""
    lines = [f"invalid run configuration ({err.error_count()} error{'s' if err.error_count() > 1 else ''})"]
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append("kind")
        if loc[:1] == ["balancer"] and len(loc) > 1 and loc[1] in _union_members(MarbleConfig, "balancer"):
            del loc[1]  # the discriminator tag pydantic puts into the location
        path = ".".join(loc)
        msg = e["msg"].removeprefix("Value error, ")
        params = [p for p in RUN_PARAMETERS if p.field == path or (not path and p.field in msg)]
        who = ", ".join(f"run parameter {p.name}" for p in params)
        if path:
            shown = repr(e.get("input")) if not isinstance(e.get("input"), dict) else "{...}"
            lines.append(f"  {who + ' ' if who else ''}({path}): {msg} (got {shown[:120]})")
        else:
            lines.append(f"  {who + ': ' if who else ''}{msg}")
    return "\n".join(lines)


def run_config_markdown(cfg: MarbleConfig, notes: list[str]) -> str:
    """The run's parameters as a Markdown table (what the validation task shows in the run view)."""
    values = run_parameter_values(cfg)
    rows = [f"| `{p.name}` | {values[p.name]!r} | `{p.field}` |" for p in RUN_PARAMETERS]
    text = [
        f"# Run configuration `{cfg.run_name}` (config hash `{cfg.config_hash()}`)",
        "",
        "| run parameter | value | config field |",
        "|---|---|---|",
        *rows,
        "",
    ]
    if notes:
        text += ["Notes:", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(text)


def parse_run_parameters(items: list[str]) -> dict[str, Any]:
    """`["epochs=5", "lr=1e-3"]` (the CLI's `--param`) -> typed values, by the table's types."""
    values: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in _BY_NAME:
            raise ConfigError(
                f"--param {item!r}: expected NAME=VALUE with NAME one of {', '.join(RUN_PARAMETER_NAMES)}"
            )
        kind = _BY_NAME[name].type
        try:
            values[name] = kind(raw)
        except ValueError:
            what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            raise ConfigError(f"--param {item!r}: {name} takes {what}, got {raw!r}") from None
    return values
