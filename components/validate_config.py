"""The first task of every run: the typed run parameters on top of the config, validated.

Its inputs are the pipeline's parameters (`marble.runparams.RUN_PARAMETERS`, one table) plus the
advanced `config` override and the compiled-in Kubernetes section; its output `config` is the run's
validated config, which every later task takes. A bad value (`lr=-1`) fails this task, before any data
is read or any GPU requested, with the parameter and its config field named.
"""

from typing import NamedTuple

from kfp.dsl import Markdown, Output

from components._factory import make_component


def validate_config(
    config: dict,
    kubernetes: dict,
    run_config: Output[Markdown],
    run_name: str,
    epochs: int,
    lr: float,
    seed: int,
    balancer_kind: str,
    balancer_refresh_every: int,
    balancer_ema_decay: float,
    sampling_steps: int,
    group_size: int,
    prompts_per_epoch: int,
    gate_max_regression: float,
    gate_max_held_out_regression: float,
    gate_max_monitor_shift: float,
) -> NamedTuple("Outputs", [("config", dict), ("config_hash", str)]):
    """`run_config` shows the run parameters, their config fields and what they replaced."""
    # Every argument except the override, the Kubernetes section and the output is a run parameter.
    values = {k: v for k, v in dict(locals()).items() if k not in ("config", "kubernetes", "run_config")}
    import logging
    from collections import namedtuple
    from pathlib import Path

    from marble.runparams import apply_run_parameters, config_dict, run_config_markdown

    cfg, notes = apply_run_parameters(config, values, kubernetes)
    for note in notes:
        logging.getLogger("marble.runparams").warning("%s", note)
    Path(run_config.path).write_text(run_config_markdown(cfg, notes), encoding="utf-8")
    run_config.metadata["config_hash"] = cfg.config_hash()
    return namedtuple("Outputs", ["config", "config_hash"])(config_dict(cfg), cfg.config_hash())


def build(containerized: bool = False):
    return make_component(validate_config, role="cpu", containerized=containerized)


component = build()
