"""`nft.kl_every = "step"`: the KL estimated on one micro-step per optimizer step, weighted by the step's
micro-step count, through the trainer's own optimizer step, for a Gram source that folds the KL into the
update's one backward (`output`) and for one that backprops it on its own (`per_sample`)."""

from __future__ import annotations

import pytest
import torch
from _train_helpers import capture_step_gradients, first_epoch, flat, train_config

from marble.configio import validate_config
from marble.data.prepare import prepare_prompts
from marble.rl.nft import kl_loss
from marble.train.update import NFTUpdate


def test_one_micro_step_per_step_takes_the_kl_and_every_index_takes_its_turn():
    M = 6
    upd = NFTUpdate(
        None, [], None, predict_velocity=None, beta=1.0, weight_floor=1e-5, kl_weight=1e-4,
        kl_every="step", micro_steps_per_step=M,
    )  # fmt: skip
    chosen = []
    for step in range(2 * M):
        scales = [upd.kl_scale(step, j) for j in range(M)]
        assert sorted(scales) == [0.0] * (M - 1) + [float(M)]  # one micro-step, weighted by M
        chosen.append(scales.index(float(M)))
    assert sorted(chosen[:M]) == list(range(M))  # over M steps every micro-step index is chosen once
    every = NFTUpdate(
        None, [], None, predict_velocity=None, beta=1.0, weight_floor=1e-5, kl_weight=1e-4,
        micro_steps_per_step=M,
    )  # fmt: skip
    assert {every.kl_scale(s, j) for s in range(3) for j in range(M)} == {1.0}


def _config(tiny_config, kind: str, kl_weight: float):
    cfg = train_config(
        tiny_config,
        nft={"kl_weight": kl_weight, "kl_every": "step"},
        train={
            "micro_batch_size": 6,
            "gradient_accumulation_steps": 2,
            "max_grad_norm": 1e9,
            "diagnostics_every": 0,
        },
    )
    return validate_config({**cfg.model_dump(mode="json"), "balancer": {"kind": kind}}, "test")


def _first_step(cfg, prompts, out):
    """(gradient of the first optimizer step [P], the KL gradient of the step's micro-step 0 [P], the KL
    value there, reference forwards during the step, the step's metrics), with the LoRA weights moved off
    zero so that the trained velocity differs from the reference one."""

    def move_off_zero(tr):
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in tr.params:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))

    with first_epoch(cfg, prompts, out, before_rollout=move_off_zero) as (tr, _, plan):
        _, v, v_ref = tr.update.forward(plan.micro_batch(0, 0, tr.text_cache, tr.device), output_grads=False)
        kl = kl_loss(v, v_ref)
        kl_grad = torch.cat([g.flatten() for g in torch.autograd.grad(kl, tr.params)])
        grads = capture_step_gradients(tr)
        disable, refs = tr.update.adapters.disabled, []

        def counting():
            refs.append(1)
            return disable()

        tr.update.adapters.disabled = counting
        metrics = tr.optimizer_step(plan, range(cfg.train.gradient_accumulation_steps))
    return flat(grads[0]), kl_grad, float(kl.detach()), len(refs), metrics


@pytest.mark.tiny_model
@pytest.mark.parametrize("kind", ["marble", "marble_full"])  # output-space Gram; per_sample
def test_the_step_gradient_gets_the_chosen_micro_steps_kl_gradient(tiny_config, tmp_path, kind):
    lam = 10.0
    cfg = _config(tiny_config, kind, lam)
    prompts = tmp_path / "prompts"
    prepare_prompts(cfg, prompts)
    with_kl, kl_grad, kl, refs, metrics = _first_step(cfg, prompts, tmp_path / "kl")
    without, _, _, _, _ = _first_step(_config(tiny_config, kind, 0.0), prompts, tmp_path / "no_kl")

    M = cfg.train.gradient_accumulation_steps * cfg.num_train_timesteps
    assert M > 1 and refs == 1  # the reference forward runs on one micro-step of the M
    assert kl > 0 and kl_grad.norm() > 0
    assert metrics["loss/kl"] == pytest.approx(kl, rel=1e-5)  # step 0 chooses micro-step 0
    # λ M KL on one micro-step, divided by the M accumulated backwards (accelerate): λ ∇KL of that batch
    torch.testing.assert_close(
        with_kl - without, lam * kl_grad, rtol=1e-3, atol=1e-3 * float(kl_grad.abs().max() * lam)
    )
