"""The promotion gate on hand-made metric tables."""

from __future__ import annotations

from _eval_helpers import reward as _reward
from _eval_helpers import scores

from marble.config import GateConfig
from marble.eval.gate import evaluate_gate


def _table(**overrides):
    """Two trained rewards that both improve significantly, one held-out that holds, quiet monitors."""
    rewards = {
        "brightness": _reward(0.3, (0.1, 0.5), 0.8),
        "colorfulness": _reward(0.1, (0.02, 0.2), 0.4),
        "jpeg": _reward(-0.05, (-0.2, 0.1), 0.5, held_out=True),
    }
    monitors = {"dark_fraction": 0.1, "saturation": 0.2}
    rewards.update(overrides.pop("rewards", {}))
    monitors.update(overrides.pop("monitors", {}))
    return scores(rewards, monitors)


def _failed_rules(result):
    return sorted({(c.rule, c.subject) for c in result.failures})


def test_passing_case():
    r = evaluate_gate(_table(), GateConfig())
    assert r.passed, r.summary()
    assert r.summary() == "passed"
    assert {c.rule for c in r.checks} == {"regression", "improvement", "held_out", "monitor", "pareto"}


def test_trained_reward_regression_fails_beyond_tolerance_only():
    table = _table(rewards={"colorfulness": _reward(-0.2, (-0.3, -0.1), 0.1, base_std=0.5)})
    r = evaluate_gate(table, GateConfig(max_regression=0.0))
    assert _failed_rules(r) == [("regression", "colorfulness")]
    # a drop of 0.2 is 0.4 base std: tolerated at 0.5 std, refused at 0.3 std
    assert evaluate_gate(table, GateConfig(max_regression=0.5)).passed
    assert not evaluate_gate(table, GateConfig(max_regression=0.3)).passed


def test_a_drop_within_noise_is_not_a_regression():
    # mean drop -0.01 but the CI straddles 0: sampling noise, not a regression (even at tolerance 0)
    table = _table(rewards={"colorfulness": _reward(-0.01, (-0.04, 0.02), 0.3)})
    assert evaluate_gate(table, GateConfig(max_regression=0.0)).passed


def test_no_significant_improvement_fails():
    table = _table(
        rewards={
            "brightness": _reward(0.3, (-0.1, 0.7), 0.8),  # positive mean, CI straddles 0
            "colorfulness": _reward(0.0, (-0.1, 0.1), 0.4),
        }
    )
    r = evaluate_gate(table, GateConfig())
    assert _failed_rules(r) == [("improvement", "*")]
    # with the CI requirement off, a positive mean delta is enough
    assert evaluate_gate(table, GateConfig(min_improvement_ci=False)).passed


def test_held_out_regression_fails():
    table = _table(rewards={"jpeg": _reward(-0.4, (-0.5, -0.3), 0.2, held_out=True, base_std=1.0)})
    r = evaluate_gate(table, GateConfig(max_held_out_regression=0.25))
    assert _failed_rules(r) == [("held_out", "jpeg")]


def test_hacked_monitor_fails():
    # every reward went up, but the images went dark: the dark-pixel fraction tripled
    r = evaluate_gate(_table(monitors={"dark_fraction": 2.0}), GateConfig())
    assert _failed_rules(r) == [("monitor", "dark_fraction")]
    assert "dark_fraction" in r.summary()


def test_pareto_dominated_by_champion_fails():
    champion = {"brightness": 0.9, "colorfulness": 0.4, "jpeg": 0.0}  # >= on both trained, > on one
    r = evaluate_gate(_table(), GateConfig(), champion=champion, champion_label="v3")
    assert _failed_rules(r) == [("pareto", "*")]
    assert "v3" in r.summary()
    # a trade-off (better on one, worse on the other) is not dominated
    assert evaluate_gate(_table(), GateConfig(), champion={"brightness": 0.9, "colorfulness": 0.3}).passed
    # the same numbers (re-registering the champion itself) are not dominated either
    assert evaluate_gate(_table(), GateConfig(), champion={"brightness": 0.8, "colorfulness": 0.4}).passed
    # the held-out reward is not a Pareto objective
    assert evaluate_gate(
        _table(), GateConfig(), champion={"brightness": 0.8, "colorfulness": 0.4, "jpeg": 9}
    ).passed
    assert evaluate_gate(_table(), GateConfig(require_not_dominated=False), champion=champion).passed


def test_reward_with_no_applicable_prompt_is_skipped():
    nan = float("nan")
    table = _table(rewards={"colorfulness": _reward(nan, (nan, nan), nan, n=0)})
    r = evaluate_gate(table, GateConfig())
    assert r.passed
    assert any(c.subject == "colorfulness" and "skipped" in c.detail for c in r.checks)
