"""Training-loop invariants on the tiny model (in process): what one step may and may not change,
NaN rewards, non-finite steps, and what a short run writes."""

from __future__ import annotations

import math

import pytest
import torch
from _train_helpers import read_metrics, train_config

from marble.data.prepare import prepare_prompts
from marble.errors import TrainingError
from marble.models import lora
from marble.train.stepping import EpochPlan
from marble.train.trainer import Trainer, run_training

pytestmark = pytest.mark.tiny_model  # loads the built tiny model (tests/conftest.py)


@pytest.fixture(scope="module")
def prompts_dir(tiny_config, tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts"
    prepare_prompts(train_config(tiny_config), path)
    return path


def _trainer(cfg, prompts_dir, out_dir) -> Trainer:
    tr = Trainer(cfg, prompts_dir, out_dir)
    tr.setup()
    return tr


def _adapter(tr: Trainer, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lora.adapter_state_dict(tr.model, name).items()}


def _base(tr: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in tr.model.named_parameters() if "lora_" not in n}


def _step(tr: Trainer, plan: EpochPlan, b: int) -> dict:
    return tr.optimizer_step(plan, range(b, b + tr.cfg.train.gradient_accumulation_steps))


def _dead_lora_keys(tr: Trainer, keys) -> set[str]:
    """LoRA weights with a structurally zero gradient: in SD3's last block (`context_pre_only`) the
    context stream's output is discarded, so its context query projection (`add_q_proj`) cannot
    influence the predicted velocity (true of SD3.5 Medium as well)."""
    blocks = tr.model.get_base_model().transformer_blocks
    dead_blocks = [i for i, blk in enumerate(blocks) if getattr(blk, "context_pre_only", False)]
    return {k for k in keys for i in dead_blocks if f"transformer_blocks.{i}.attn.add_q_proj." in k}


def test_step_changes_every_lora_param_and_nothing_else(tiny_config, prompts_dir, tmp_path):
    # weight decay off, so a change can only come from a gradient
    cfg = train_config(tiny_config, train={"weight_decay": 0.0})
    tr = _trainer(cfg, prompts_dir, tmp_path / "run")
    try:
        default0, old0, base0 = _adapter(tr, "default"), _adapter(tr, "old"), _base(tr)
        assert default0 and old0 and base0
        live = [k for k in default0 if k not in _dead_lora_keys(tr, default0)]
        plan = EpochPlan(cfg, tr.rollout(0), 1, 0, tr.grid)
        _step(tr, plan, 0)
        default1 = _adapter(tr, "default")
        # gaussian LoRA init: B = 0, so at the first step only the B matrices get a gradient
        unchanged_b = [k for k in live if "lora_B" in k and torch.equal(default0[k], default1[k])]
        assert not unchanged_b, unchanged_b
        _step(tr, plan, 1)
        default2 = _adapter(tr, "default")
        unchanged = [k for k in live if torch.equal(default0[k], default2[k])]
        assert not unchanged, f"LoRA params not updated: {unchanged[:5]}"
        for k, v in _adapter(tr, "old").items():
            assert torch.equal(v, old0[k]), f"old adapter changed: {k}"
        for k, v in _base(tr).items():
            assert torch.equal(v, base0[k]), f"base weight changed: {k}"
    finally:
        tr.cleanup()


def test_nan_rewards_never_reach_advantages_or_loss(tiny_config, prompts_dir, tmp_path):
    cfg = train_config(tiny_config)
    tr = _trainer(cfg, prompts_dir, tmp_path / "run")
    real = tr.worker.score_all

    def broken_scores(rewards, images, prompts, metadata, **kw):
        R = real(rewards, images, prompts, metadata, **kw).clone()  # [n, K]
        R[::3, 0] = math.nan  # a general reward failing on some images
        R[1, 1] = math.inf
        R[:, -1] = math.nan  # a reward that applies to nothing this epoch
        return R

    tr.worker.score_all = broken_scores
    try:
        buf = tr.rollout(0)
        assert not buf.mask[:, -1].any() and not buf.mask[::3, 0].any()
        assert torch.isfinite(buf.r).all() and torch.isfinite(buf.r_raw).all()
        plan = EpochPlan(cfg, buf, 1, 0, tr.grid)
        for b in range(plan.num_batches):
            metrics = _step(tr, plan, b)
            assert math.isfinite(metrics["loss/policy"]) and math.isfinite(metrics["loss/kl"])
            assert math.isfinite(metrics["train/grad_norm"])
        assert tr.counters["skipped_steps"] == 0
        assert all(torch.isfinite(v).all() for v in _adapter(tr, "default").values())
    finally:
        tr.cleanup()


def test_nonfinite_step_is_skipped_then_aborts(tiny_config, prompts_dir, tmp_path):
    cfg = train_config(tiny_config, train={"max_consecutive_skips": 2})
    tr = _trainer(cfg, prompts_dir, tmp_path / "run")
    try:
        plan = EpochPlan(cfg, tr.rollout(0), 1, 0, tr.grid)
        _step(tr, plan, 0)  # a good step, so the optimizer has state to protect
        params0 = _adapter(tr, "default")
        opt0 = {k: v.clone() for k, v in tr.optimizer.state_dict()["state"][0].items()}
        balancer0 = tr.balancer.state_dict()
        good = tr.update.micro_step

        def poisoned(mb, step, micro):
            res = good(mb, step, micro)
            res.loss = res.loss * float("nan")
            return res

        tr.update.micro_step = poisoned
        _step(tr, plan, 1)
        assert tr.counters["skipped_steps"] == 1
        for k, v in _adapter(tr, "default").items():
            assert torch.equal(v, params0[k])
        for k, v in tr.optimizer.state_dict()["state"][0].items():
            assert torch.equal(v, opt0[k]), f"optimizer state {k} changed on a skipped step"
        assert tr.balancer.state_dict() == balancer0
        with pytest.raises(TrainingError, match="max_consecutive_skips=2"):
            _step(tr, plan, 0)
    finally:
        tr.cleanup()


def test_short_run_writes_adapter_checkpoints_metrics(tiny_config, prompts_dir, tmp_path):
    cfg = train_config(tiny_config, train={"epochs": 2, "tensorboard": True})
    out = tmp_path / "run"
    adapter = run_training(cfg, prompts_dir, out)
    assert adapter == out / "adapter"
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "adapter-raw" / "pytorch_lora_weights.safetensors").is_file()
    assert [p.name for p in sorted((out / "checkpoints").glob("step-*"))] == ["step-00000004"]
    recs = read_metrics(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    names = cfg.trained_reward_names
    for key in [f"train/reward/{n}" for n in names] + [f"balance/alpha/{n}" for n in names]:
        assert all(key in r for r in recs), key
    assert sum(r[f"balance/alpha/{n}"] for n in names for r in recs[-1:]) == pytest.approx(1.0)
    assert "diag/cos_applied/min" in recs[0] and "balance/alpha_fresh/" + names[0] in recs[0]
    # balancer figures every step; the default refreshes all micro-steps of its first step (§4.6), then
    # the first timestep slot of every micro-batch of every refresh_every-th step (here: step 3)
    every = [
        "balance/refreshed",
        "balance/cos_output_min",
        "balance/cos_output_negative_frac",
        *(
            f"balance/{m}/{n}"
            for m in ("alpha_fresh", "gamma", "batch_grad_norm", "cos_output")
            for n in names
        ),
    ]
    for key in every:
        assert all(key in r for r in recs), key
    T, accum = cfg.num_train_timesteps, cfg.train.gradient_accumulation_steps
    assert [r["balance/refresh_micro_steps"] for r in recs] == [T * accum, 0, 0, accum]
    assert [r["balance/refreshed"] for r in recs] == [1.0, 0.0, 0.0, 1.0]
    assert (out / "curves.csv").read_text().splitlines()[0].startswith("step,train/reward/")
    assert len((out / "alpha.csv").read_text().splitlines()) == 5
    assert list((out / "tensorboard").iterdir())
    assert (out / "train_summary.json").is_file()
