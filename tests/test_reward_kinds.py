"""Each reward kind is declared once (its config class in marble.config); every table derives from it.

The config union, the class table `REWARD_KINDS`, the applicability rules and the artifacts the cache
snapshots and the lineage records must name the same kinds and the same model repos.
"""

from __future__ import annotations

import typing

import pytest

from marble.config import (
    REWARD_KIND_DECLARATIONS,
    REWARD_SPEC_BY_KIND,
    REWARD_SPECS,
    ApplicabilityRule,
    MarbleConfig,
    RewardSpec,
)
from marble.data.applicability import KIND_RULES, RULES
from marble.rewards.base import BaseReward
from marble.rewards.registry import REWARD_KINDS, build_reward, reward_class

UNION_MEMBERS = typing.get_args(typing.get_args(RewardSpec)[0])


def _kinds(spec_cls) -> tuple[str, ...]:
    return typing.get_args(spec_cls.model_fields["kind"].annotation)


def _default_spec(kind: str):
    required = {"url": "http://127.0.0.1:9/score"} if kind == "http" else {}
    return REWARD_SPEC_BY_KIND[kind](kind=kind, name=f"my_{kind}", **required)


def test_reward_kinds_match_the_config_union():
    union_kinds = [kind for m in UNION_MEMBERS for kind in _kinds(m)]
    assert set(UNION_MEMBERS) == set(REWARD_SPECS)
    assert len(union_kinds) == len(set(union_kinds)), "two config classes declare the same kind"
    assert set(REWARD_KINDS) == set(union_kinds) == set(REWARD_SPEC_BY_KIND)
    for spec_cls in REWARD_SPECS:  # each class's table of kinds is exactly the kinds its field accepts
        assert set(spec_cls.declared_kinds()) == set(_kinds(spec_cls)), spec_cls.__name__
    # a config naming each kind validates, and builds the class the table names
    for kind in union_kinds:
        cfg = MarbleConfig.model_validate(
            {"rewards": [_default_spec(kind).model_dump()], "sampling": {"resolution": 64}}
        )
        assert cfg.rewards[0].kind == kind
        reward = build_reward(cfg.rewards[0])
        module, name = REWARD_KINDS[kind].split(":")
        assert type(reward).__module__ == module and type(reward).__name__ == name
        assert isinstance(reward, BaseReward)


def test_unknown_kind_is_refused_by_the_config():
    with pytest.raises(ValueError, match="mystery"):
        MarbleConfig.model_validate({"rewards": [{"kind": "mystery", "name": "m"}]})


def test_every_kind_has_exactly_one_applicability_source():
    for kind, spec_cls in REWARD_SPEC_BY_KIND.items():
        configured = "applies_when" in spec_cls.model_fields
        # either the kind fixes its rule, or each reward of the kind chooses one (http), never both
        assert (REWARD_KIND_DECLARATIONS[kind][1] is None) == configured, kind
        assert (kind in KIND_RULES) == (not configured), kind
        if not configured:
            assert KIND_RULES[kind] in RULES
    assert set(typing.get_args(ApplicabilityRule)) == set(RULES)


def _model_fields_of(spec) -> dict[str, str | None]:
    """Every repo a spec names, with its revision: a field `x` (or `x_model`) paired with `x_revision`,
    and `model` with `revision`."""
    fields = type(spec).model_fields
    out = {}
    for field in fields:
        rev_field = "revision" if field == "model" else f"{field.removesuffix('_model')}_revision"
        if rev_field in fields and field != rev_field:
            out[getattr(spec, field)] = getattr(spec, rev_field)
    return out


@pytest.mark.parametrize("kind", sorted(REWARD_SPEC_BY_KIND))
def test_artifacts_cover_every_repo_the_spec_names(kind):
    spec = _default_spec(kind)
    if hasattr(spec, "backend") and spec.backend != "trocr":
        pytest.skip("easyocr and paddle fetch their own weights")
    named = _model_fields_of(spec)
    arts = {a.id: a.revision for a in reward_class(spec.kind).artifacts(spec)}
    assert arts == named, f"{spec.kind}: artifacts {arts} but the config names {named}"


def test_lineage_records_the_artifacts_of_every_reward():
    from marble.config import ImageRewardReward
    from marble.eval.lineage import reward_lineage

    cfg = MarbleConfig.model_validate(
        {
            "sampling": {"resolution": 64},
            "rewards": [
                {"kind": "brightness", "name": "b"},
                ImageRewardReward(name="ir", revision="abc", tokenizer_revision="def").model_dump(),
            ],
        }
    )
    lin = reward_lineage(cfg, None)
    assert lin.rewards["b"].artifacts == []
    got = {(a.id, a.revision) for a in lin.rewards["ir"].artifacts}
    assert got == {("THUDM/ImageReward", "abc"), ("google-bert/bert-base-uncased", "def")}
