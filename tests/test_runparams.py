"""Typed run parameters: the table, defaults from a config, applying them, and their errors."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from marble.config import MarbleConfig
from marble.configio import ConfigError, load_config
from marble.runparams import (
    RUN_PARAMETER_NAMES,
    RUN_PARAMETERS,
    _node_model,
    apply_run_parameters,
    kubernetes_section,
    override_parameter,
    parse_run_parameters,
    run_config_markdown,
    run_parameter_values,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny() -> MarbleConfig:
    return load_config(REPO / "configs" / "tiny.yaml")


def resolve(cfg: MarbleConfig, **changes):
    return apply_run_parameters(
        override_parameter(cfg), {**run_parameter_values(cfg), **changes}, kubernetes_section(cfg)
    )


def test_every_parameter_names_a_schema_field_of_its_type():
    assert len(set(RUN_PARAMETER_NAMES)) == len(RUN_PARAMETERS)
    for p in RUN_PARAMETERS:
        *parents, leaf = p.field.split(".")
        annotation = _node_model(parents).model_fields[leaf].annotation
        allowed = {a for a in typing.get_args(annotation)} | {annotation}
        if p.field == "balancer.kind" or p.field == "run_name":
            assert p.type is str
        else:
            assert p.type in allowed, (p.name, annotation)
        assert p.description and p.field in p.description
        assert not p.field.startswith("pipeline."), "Kubernetes settings are no run parameters"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_shipped_configs_round_trip_through_their_parameters(path):
    cfg = load_config(path)
    values = run_parameter_values(cfg)
    for p in RUN_PARAMETERS:
        assert type(values[p.name]) is p.type, p.name
    resolved, notes = resolve(cfg)
    assert resolved == cfg and resolved.config_hash() == cfg.config_hash()
    assert notes == []


def test_a_bad_value_names_the_parameter_and_the_field(tiny):
    with pytest.raises(ConfigError) as err:
        resolve(tiny, lr=-1.0)
    assert "run parameter lr (train.lr): Input should be greater than 0 (got -1.0)" in str(err.value)
    with pytest.raises(ConfigError, match=r"run parameter group_size: sampling.group_size=1"):
        resolve(tiny, group_size=1)
    with pytest.raises(ConfigError, match=r"run parameter balancer_kind \(balancer.kind\): Input tag 'nope'"):
        resolve(tiny, balancer_kind="nope")
    with pytest.raises(ConfigError, match=r"run parameter balancer_refresh_every \(balancer.refresh_every\)"):
        resolve(tiny, balancer_refresh_every=0)
    with pytest.raises(ConfigError, match="unknown run parameter"):
        apply_run_parameters(override_parameter(tiny), {"gpus": 2})


def test_parameters_replace_the_fields_they_name_and_say_so(tiny):
    override = override_parameter(tiny)
    override["train"]["epochs"] = 500
    values = {**run_parameter_values(tiny), "epochs": 3, "gate_max_monitor_shift": 2.0}
    cfg, notes = apply_run_parameters(override, values, kubernetes_section(tiny))
    assert cfg.train.epochs == 3 and cfg.eval.gate.max_monitor_shift == 2.0
    assert "train.epochs: run parameter epochs=3 replaces the config's 500" in notes
    # The rest of the override is kept.
    assert cfg.rewards == tiny.rewards and cfg.pipeline == tiny.pipeline


def test_the_compiled_kubernetes_section_wins_over_the_overrides(tiny):
    override = {**override_parameter(tiny), "pipeline": {"gpus": 8}}
    cfg, notes = apply_run_parameters(override, run_parameter_values(tiny), kubernetes_section(tiny))
    assert cfg.pipeline == tiny.pipeline
    assert any("compiled one" in n for n in notes)


def test_a_new_balancer_kind_starts_from_its_preset_with_the_knobs_applied(tiny):
    cfg, notes = resolve(tiny, balancer_kind="marble_full", balancer_ema_decay=0.0, balancer_refresh_every=1)
    assert cfg.balancer.kind == "marble_full" and cfg.balancer.refresh_micro_steps == "all"
    # 0 is the parameter form of the preset's null: nothing to change, the preset stays null.
    assert cfg.balancer.ema_decay is None and cfg.balancer.refresh_every == 1
    marble = MarbleConfig.model_validate({**tiny.model_dump(), "balancer": {"kind": "marble"}})
    cfg, notes = resolve(marble, balancer_kind="equal")
    assert cfg.balancer.kind == "equal" and not any("ignored" in n for n in notes)
    cfg, notes = resolve(tiny, balancer_kind="equal", balancer_refresh_every=3)
    assert "balancer_refresh_every=3 does not apply to balancer kind 'equal'; ignored" in notes
    with pytest.raises(ConfigError, match="balancer.weights"):
        resolve(tiny, balancer_kind="weighted_sum")


def test_ema_zero_is_the_null_of_the_config(tiny):
    """α = ρ·α_prev + (1-ρ)·α_fresh with ρ = 0 is α_fresh: the same as no EMA (null)."""
    null = MarbleConfig.model_validate({**tiny.model_dump(), "balancer": {"kind": "pcgrad"}})
    assert null.balancer.ema_decay is None
    assert run_parameter_values(null)["balancer_ema_decay"] == 0.0
    cfg, _ = resolve(null)
    assert cfg.balancer.ema_decay is None
    marble = MarbleConfig.model_validate({**tiny.model_dump(), "balancer": {"kind": "marble"}})
    cfg, _ = resolve(marble, balancer_ema_decay=0.0)
    assert cfg.balancer.ema_decay == 0.0


def test_parse_run_parameters_types_values_by_the_table():
    assert parse_run_parameters(["epochs=5", "lr=1e-3", "balancer_kind=equal"]) == {
        "epochs": 5,
        "lr": 0.001,
        "balancer_kind": "equal",
    }
    with pytest.raises(ConfigError, match="epochs takes an integer"):
        parse_run_parameters(["epochs=five"])
    with pytest.raises(ConfigError, match="NAME=VALUE"):
        parse_run_parameters(["epochs"])


def test_run_config_markdown_lists_every_parameter_and_the_notes(tiny):
    text = run_config_markdown(tiny, ["train.epochs: run parameter epochs=3 replaces the config's 500"])
    for p in RUN_PARAMETERS:
        assert f"| `{p.name}` |" in text and f"`{p.field}`" in text
    assert tiny.config_hash() in text and "replaces the config's 500" in text
