"""The per_sample Gram source through the trainer's own optimizer step: the same gradient and the same
balancing coefficients as the exact `params` source (K backward passes), with gradient accumulation
(the formed policy gradient is scaled as accelerate scales a backward) and with or without the KL."""

from __future__ import annotations

import pytest
import torch
from _train_helpers import capture_step_gradients, first_epoch, first_step_gradient, flat, train_config

from marble.configio import validate_config
from marble.data.prepare import prepare_prompts

pytestmark = pytest.mark.tiny_model  # loads the built tiny model (tests/conftest.py)


def _config(tiny_config, gram_source: str, kl_weight: float, **balancer_keys):
    cfg = train_config(
        tiny_config,
        nft={"kl_weight": kl_weight},
        train={
            "micro_batch_size": 6,
            "gradient_accumulation_steps": 2,
            "max_grad_norm": 1e9,
            "diagnostics_every": 1 if balancer_keys else 0,
        },
    )
    balancer = {"kind": "marble_full", "gram_source": gram_source, **balancer_keys}
    return validate_config({**cfg.model_dump(mode="json"), "balancer": balancer}, "test")


@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
def test_per_sample_step_equals_the_k_backward_step(tiny_config, tmp_path, kl_weight):
    exact_cfg = _config(tiny_config, "params", kl_weight)
    prompts = tmp_path / "prompts"
    prepare_prompts(exact_cfg, prompts)
    exact, lat_a, m_a = first_step_gradient(exact_cfg, prompts, tmp_path / "params")
    fast, lat_b, m_b = first_step_gradient(
        _config(tiny_config, "per_sample", kl_weight), prompts, tmp_path / "ps"
    )

    assert torch.equal(lat_a, lat_b), "both runs must train on the same rollouts"
    flat_a = torch.cat([exact[k].flatten() for k in sorted(exact)])  # [P]
    flat_b = torch.cat([fast[k].flatten() for k in sorted(fast)])  # [P]
    assert flat_a.norm() > 0
    # the trained and old adapters coincide at the first step: exact up to float32 sums in another order
    torch.testing.assert_close(flat_b, flat_a, rtol=0, atol=1e-4 * float(flat_a.abs().max()))
    alphas = [k for k in m_a if k.startswith("balance/alpha/")]
    assert alphas
    for k in alphas:
        assert m_b[k] == pytest.approx(m_a[k], abs=1e-5), k
    assert m_b["loss/kl"] == pytest.approx(m_a["loss/kl"], rel=1e-6, abs=1e-12)
    assert "balance/cos_params_min" in m_b and "balance/cos_output_min" not in m_b
    assert m_b["balance/cos_params_negative_frac"] == 0.0  # fresh MGDA on the exact Gram of each batch


def test_per_sample_diagnostics_apply_the_parameter_gram_norms(tiny_config, tmp_path):
    """With normalize=batch, the applied direction the diagnostics report takes the batch norms from the
    Gram the balancer trains on: for per_sample the parameter-space one, not the output-space one."""
    from marble.rl.gram import gram_from_params
    from marble.rl.nft import per_reward_losses
    from marble.train import stepping

    cfg = _config(tiny_config, "per_sample", 0.0, normalize="batch")
    prompts = tmp_path / "prompts"
    prepare_prompts(cfg, prompts)
    with first_epoch(cfg, prompts, tmp_path / "run") as (tr, _, plan):
        mb = plan.micro_batch(0, 0, tr.text_cache, tr.device)
        cosines = stepping.direction_cosines()
        diag = tr.update.diagnose(mb, cosines)
        terms, _, _ = tr.update.forward(mb, output_grads=True)
        pg = gram_from_params(
            per_reward_losses(terms, mb.c_raw, mb.r_raw, cfg.nft.beta), tr.update.params, keep_grads=True
        )

        def applied_min(gram):
            gamma = tr.balancer.batch_gamma(gram).gamma.to(pg.grads.dtype)
            return float(cosines(gamma @ pg.grads, pg.grads).min)

        expected = applied_min(pg.gram)
        assert diag["diag/cos_applied/min"] == pytest.approx(expected, abs=1e-5)
        # the check can fail: the output-space norms give another direction on this batch
        assert abs(applied_min(tr.update.output_gram(terms, mb.c, mb.r)) - expected) > 1e-4


def test_step_solver_applies_mgda_of_the_steps_summed_gradients(tiny_config, tmp_path):
    """marble_step through the trainer's own optimizer step: the gradient it applies is `γ Σ_m g_m`
    (scaled as accelerate scales the step's backwards), with g_m every reward's gradient on micro-step m
    (here by K backward passes each) and γ the fresh normalised MGDA of their sum's Gram; the step's
    exact cosines are all non-negative."""
    from marble.rl.balancers import mgda_gamma
    from marble.rl.gram import gram_from_params, stacked_gram
    from marble.rl.nft import per_reward_losses

    cfg = _config(tiny_config, "per_sample", 0.0)
    cfg = validate_config({**cfg.model_dump(mode="json"), "balancer": {"kind": "marble_step"}}, "test")
    prompts = tmp_path / "prompts"
    prepare_prompts(cfg, prompts)
    with first_epoch(cfg, prompts, tmp_path / "run") as (tr, _, plan):
        accum, T = cfg.train.gradient_accumulation_steps, cfg.num_train_timesteps
        summed = 0
        for b in range(accum):
            for j in range(T):
                mb = plan.micro_batch(b, j, tr.text_cache, tr.device)
                terms, _, _ = tr.update.forward(mb, output_grads=False, with_ref=False)
                losses = per_reward_losses(terms, mb.c, mb.r, cfg.nft.beta)  # [K]
                summed = (
                    summed + gram_from_params(losses, tr.params, keep_grads=True).grads.double()
                )  # [K, P]
        gamma = mgda_gamma(stacked_gram(summed))  # [K]
        expected = (gamma @ summed) / (accum * T)  # [P]
        applied = capture_step_gradients(tr)
        metrics = tr.optimizer_step(plan, range(accum))
    assert expected.norm() > 0 and (gamma > 0).sum() >= 2  # a real balance of several rewards
    torch.testing.assert_close(
        flat(applied[0]).double(), expected, rtol=0, atol=1e-4 * float(expected.abs().max())
    )
    assert metrics["balance/cos_params_negative_frac"] == 0.0 and metrics["balance/cos_params_min"] >= 0
    assert metrics["balance/refreshed"] == 1.0
