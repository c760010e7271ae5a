"""The config tree: every validation rule has a failing and a passing case; CLI errors name the field."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from marble.cli import main
from marble.config import MarbleConfig
from marble.configio import ConfigError, apply_overrides, load_config, read_config_dict, validate_config
from marble.schema import SCHEMA_PATH, schema_json

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
PAPER = REPO / "configs" / "sd35m-marble.yaml"


@pytest.fixture
def tiny_dict() -> dict:
    return read_config_dict(TINY)


def _refused(data: dict, *needles: str) -> str:
    with pytest.raises(ConfigError) as exc:
        validate_config(data, "test.yaml")
    msg = str(exc.value)
    for needle in needles:
        assert needle in msg, msg
    return msg


@pytest.mark.parametrize("path", [TINY, PAPER], ids=["tiny", "sd35m"])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.trained_rewards


def test_paper_config_carries_the_papers_numbers():
    cfg = load_config(PAPER)
    assert cfg.model.pretrained == "stabilityai/stable-diffusion-3.5-medium"
    assert (cfg.sampling.group_size, cfg.sampling.prompts_per_epoch, cfg.sampling.num_steps) == (24, 48, 25)
    assert cfg.sampling.samples_per_epoch == 1152
    assert cfg.nft.beta == 0.1 and cfg.nft.old_decay_cap == 0.95
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.train.lr) == (32, 64, 3e-4)
    # the shipped balancer is the one the reward study chose (docs/algorithm.md §4.6), with the KL once per
    # step that keeps it at one backward per micro-step; the paper's schedule is a preset
    assert (cfg.balancer.kind, cfg.balancer.gram_source, cfg.nft.kl_every) == (
        "marble_step",
        "per_sample",
        "step",
    )
    assert load_config(TINY).balancer.kind == cfg.balancer.kind  # both shipped configs, one default
    paper = load_config(PAPER, ['balancer={"kind": "marble_paper"}']).balancer
    assert (paper.gram_source, paper.ema_decay, paper.refresh_every) == ("params", 0.7, 10)
    assert (paper.refresh, paper.refresh_micro_steps, paper.normalize) == ("micro_batch", "first", "refresh")
    assert len(cfg.trained_rewards) == 5
    # 25 steps, first 99% of a permutation trained [NFT]
    assert cfg.num_train_timesteps == 24


def test_params_yaml_validates_when_present():
    params = REPO / "params.yaml"
    if not params.exists():
        pytest.skip("params.yaml not generated yet")
    validate_config(read_config_dict(params), "params.yaml")


def test_schema_file_in_sync():
    assert (REPO / SCHEMA_PATH).read_text() == schema_json(), (
        "run: marble config schema --out docs/config-schema.json"
    )


# ------------------------------------------------------------------ one failing + one passing case per rule
def test_unknown_key_refused_with_path(tiny_dict):
    bad = copy.deepcopy(tiny_dict)
    bad["train"]["learning_rate"] = 1.0
    _refused(bad, "train.learning_rate", "unknown key")
    validate_config(tiny_dict)


def test_negative_beta_refused(tiny_dict):
    bad = copy.deepcopy(tiny_dict)
    bad["nft"]["beta"] = -0.1
    _refused(bad, "nft.beta", "-0.1")
    ok = copy.deepcopy(tiny_dict)
    ok["nft"]["beta"] = 1.0
    assert validate_config(ok).nft.beta == 1.0


def test_weighted_sum_needs_one_weight_per_trained_reward(tiny_dict):
    bad = copy.deepcopy(tiny_dict)
    bad["balancer"] = {"kind": "weighted_sum"}
    k = sum(not r.get("held_out", False) for r in tiny_dict["rewards"])
    _refused(bad, "balancer.weights", str(k))
    bad["balancer"]["weights"] = [1, 1]
    _refused(bad, "2 entries", f"{k} trained rewards")
    bad["balancer"]["weights"] = [1, -1] + [1] * (k - 2)
    _refused(bad, "balancer.weights")
    ok = copy.deepcopy(tiny_dict)
    ok["balancer"] = {"kind": "weighted_sum", "weights": [1] * k}
    assert validate_config(ok).balancer.weights == [1] * k


def test_reward_names_unique(tiny_dict):
    bad = copy.deepcopy(tiny_dict)
    bad["rewards"].append({"name": "brightness", "kind": "colorfulness"})
    _refused(bad, "unique", "brightness")


def test_all_rewards_held_out_refused(tiny_dict):
    bad = copy.deepcopy(tiny_dict)
    for r in bad["rewards"]:
        r["held_out"] = True
    _refused(bad, "held_out")


def test_group_size_at_least_two(tiny_dict):
    bad = copy.deepcopy(tiny_dict)
    bad["sampling"]["group_size"] = 1
    bad["train"]["micro_batch_size"] = 2
    bad["train"]["gradient_accumulation_steps"] = 1
    _refused(bad, "sampling.group_size=1")


def test_micro_batch_must_divide_epoch_samples(tiny_dict):
    bad = copy.deepcopy(tiny_dict)
    bad["train"]["micro_batch_size"] = 7  # 8 x 6 = 48 samples, 7 does not divide
    _refused(bad, "train.micro_batch_size=7", "48")
    ok = copy.deepcopy(tiny_dict)
    ok["train"]["micro_batch_size"] = 8
    ok["train"]["gradient_accumulation_steps"] = 2
    validate_config(ok)


def test_accumulation_must_divide_micro_batches(tiny_dict):
    bad = copy.deepcopy(tiny_dict)
    bad["train"]["micro_batch_size"] = 16
    bad["train"]["gradient_accumulation_steps"] = 2  # 48 / 16 = 3 micro-batches
    _refused(bad, "gradient_accumulation_steps=2", "3 micro-batches")


def test_resolution_divisible_by_vae_factor(tiny_dict):
    bad = copy.deepcopy(tiny_dict)
    bad["eval"]["resolution"] = 72  # not a multiple of 8 x 2
    _refused(bad, "eval.resolution=72", "16")
    paper = read_config_dict(PAPER)
    paper["sampling"]["resolution"] = 520
    _refused(paper, "sampling.resolution=520")


def test_guided_rollouts_are_refused_at_validation(tiny_dict):
    bad = copy.deepcopy(tiny_dict)
    bad["sampling"]["guidance_scale"] = 4.5
    _refused(bad, "sampling.guidance_scale", "CFG-free", "eval.guidance_scale")
    ok = copy.deepcopy(tiny_dict)
    ok["eval"]["guidance_scale"] = 4.5  # guided evaluation runs the stock pipeline's CFG
    validate_config(ok)


def test_tiny_resolution_must_match(tiny_dict):
    bad = copy.deepcopy(tiny_dict)
    bad["sampling"]["resolution"] = 128
    _refused(bad, "model.tiny.resolution")


def test_discriminated_union_names_the_kind(tiny_dict):
    bad = copy.deepcopy(tiny_dict)
    bad["rewards"][0] = {"name": "x", "kind": "no_such_reward"}
    _refused(bad, "rewards.0", "no_such_reward")


def test_run_name_pattern(tiny_dict):
    bad = copy.deepcopy(tiny_dict)
    bad["run_name"] = "../escape"
    _refused(bad, "run_name")


# ----------------------------------------------------------------------------------- overrides + CLI
def test_set_overrides_apply_and_validate():
    cfg = load_config(TINY, ["train.lr=1e-4", "rewards.0.held_out=true", "balancer.ema_decay=null"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.rewards[0].held_out is True
    assert cfg.balancer.ema_decay is None
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(TINY, ["train.lr=-3"])
    with pytest.raises(ConfigError, match="not an index"):
        load_config(TINY, ["rewards.99.name=x"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])


def test_cli_validate_ok_and_refusals(tmp_path, capsys):
    assert main(["config", "validate", str(TINY), str(PAPER)]) == 0
    data = yaml.safe_load(TINY.read_text())
    data["nft"]["beta"] = -1
    data["bogus"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert main(["config", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "nft.beta" in err and "bogus" in err and "Traceback" not in err


def test_cli_missing_and_empty_files(tmp_path, capsys):
    assert main(["config", "validate", str(tmp_path / "nope.yaml")]) == 2
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert main(["config", "validate", str(empty)]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "empty" in err


def test_cli_show_with_override(capsys):
    assert main(["config", "show", "--config", str(TINY), "--set", "train.lr=1e-4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["lr"] == pytest.approx(1e-4)
    assert MarbleConfig.model_validate(shown).train.lr == pytest.approx(1e-4)


def test_config_hash_changes_with_content():
    a = load_config(TINY)
    b = load_config(TINY, ["train.lr=1e-4"])
    assert a.config_hash() == load_config(TINY).config_hash() != b.config_hash()


def test_cli_exit_codes_separate_user_errors_from_internal_ones(monkeypatch, capsys):
    from marble import cli
    from marble.errors import DataError, InternalError

    def fails_with(exc):
        def command(args):
            raise exc

        return command

    monkeypatch.setattr(cli, "cmd_config_show", fails_with(DataError("prompts.txt:3: blank line")))
    assert cli.main(["config", "show", "-c", str(TINY)]) == 2
    err = capsys.readouterr().err
    assert "prompts.txt:3: blank line" in err and "Traceback" not in err
    monkeypatch.setattr(cli, "cmd_config_show", fails_with(InternalError("plan and accumulation disagree")))
    assert cli.main(["config", "show", "-c", str(TINY)]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "a bug in marble" in err and "plan and accumulation disagree" in err
