"""Token-limit estimate, duplicates policy, stratified split, and the reward applicability rule."""

from __future__ import annotations

from collections import Counter

import pytest

from marble.config import DataConfig, HttpReward
from marble.data.applicability import reward_applies, spec_applies
from marble.data.mixing import apply_token_limit, mix, stratified_split
from marble.data.records import PromptRecord, normalize_prompt, prompt_id
from marble.data.sources import RawPrompt
from marble.data.tokens import CLIP_MAX_TOKENS, estimate_tokens, token_limit, truncate_to_tokens
from marble.data.validation import Location
from marble.errors import DataError


def _raw(prompt: str, line: int, family: str = "f", metadata: dict | None = None) -> RawPrompt:
    return RawPrompt(prompt, family, metadata or {}, Location("src.txt", line))


# ----------------------------------------------------------------------------------------- tokens
@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a cat", 2),  # two short words
        ("photojournalism", 3),  # 15 letters -> ceil(15/6) = 3
        ("a cat, 2024!", 2 + 1 + 4 + 1),  # words, comma, one token per digit, "!"
        ("it's", 2),  # "it" + "'s" (CLIP splits contractions)
        ("日本", 2),  # non-ASCII letters: one per character
        ("", 0),
    ],
)
def test_estimate_tokens_hand_counted(prompt, expected):
    assert estimate_tokens(prompt) == expected


def test_token_limit_is_the_tighter_of_clip_and_t5():
    assert token_limit(256).max_tokens == CLIP_MAX_TOKENS - 2 == 75
    assert token_limit(32).max_tokens == 31
    assert "T5" in token_limit(32).reason and "CLIP" in token_limit(256).reason


def test_truncate_keeps_a_prefix_within_the_limit():
    prompt = "one two three, four five six seven"
    cut = truncate_to_tokens(prompt, 4)
    assert cut == "one two three,"
    assert estimate_tokens(cut) <= 4 and prompt.startswith(cut)
    assert truncate_to_tokens(prompt, 100) == prompt
    long_word = "a " + "x" * 30  # 1 + 5 tokens; a limit of 3 keeps 2 * 6 letters of the long word
    assert truncate_to_tokens(long_word, 3) == "a " + "x" * 12


def test_overlong_rejected_with_location_or_truncated():
    long = " ".join(["word"] * 40)  # 40 estimated tokens
    prompts = [_raw("short one", 1), _raw(long, 2)]
    with pytest.raises(DataError, match=r"src.txt:2: field prompt: about 40 tokens .* limit of 31"):
        apply_token_limit(prompts, DataConfig(on_overlong="reject"), max_sequence_length=32)
    out, n = apply_token_limit(prompts, DataConfig(on_overlong="truncate"), max_sequence_length=32)
    assert n == 1 and out[0].prompt == "short one"
    assert estimate_tokens(out[1].prompt) == 31 and out[1].where.line == 2


# ------------------------------------------------------------------------------------- duplicates
def test_duplicates_after_whitespace_normalisation_rejected_or_dropped():
    prompts = [_raw("a  cat", 1), _raw("a dog", 2), _raw(" a cat ", 3)]
    with pytest.raises(DataError, match=r"src.txt:3: field prompt: duplicate of src.txt:1"):
        mix(prompts, DataConfig(on_duplicate="reject"))
    out, dropped = mix(prompts, DataConfig(on_duplicate="drop"))
    assert dropped == 1 and [r.prompt for r, _ in out] == ["a cat", "a dog"]


def test_dropped_duplicate_with_different_metadata_is_refused():
    prompts = [_raw("a cat", 1, metadata={"tag": "a"}), _raw("a cat", 5, metadata={"tag": "b"})]
    with pytest.raises(DataError, match=r"src.txt:5: field metadata: duplicate prompt of src.txt:1"):
        mix(prompts, DataConfig(on_duplicate="drop"))


def test_prompt_id_is_stable_and_whitespace_insensitive():
    assert prompt_id("a  cat\t") == prompt_id("a cat") == PromptRecord.create(" a cat", "f").id
    assert len(prompt_id("a cat")) == 12 and prompt_id("a cat") != prompt_id("a Cat")
    assert normalize_prompt(" a \n b ") == "a b"


# ------------------------------------------------------------------------------------------ split
def _records(counts: dict[str, int]) -> list[PromptRecord]:
    return [PromptRecord.create(f"{fam} prompt {i}", fam) for fam, n in counts.items() for i in range(n)]


def test_split_is_stratified_per_family_and_partitions_the_set():
    recs = _records({"a": 40, "b": 12, "c": 4})
    train, test = stratified_split(recs, 0.25, seed=0)
    assert Counter(r.family for r in test) == {"a": 10, "b": 3, "c": 1}
    assert sorted(r.id for r in train + test) == sorted(r.id for r in recs)
    assert not {r.id for r in train} & {r.id for r in test}
    # both halves keep the input order
    order = {r.id: i for i, r in enumerate(recs)}
    assert [order[r.id] for r in train] == sorted(order[r.id] for r in train)


def test_split_is_deterministic_depends_on_seed_not_on_input_order():
    recs = _records({"a": 30, "b": 30})
    _, t0 = stratified_split(recs, 0.3, seed=0)
    _, t0_again = stratified_split(list(reversed(recs)), 0.3, seed=0)
    _, t1 = stratified_split(recs, 0.3, seed=1)
    assert {r.id for r in t0} == {r.id for r in t0_again}
    assert {r.id for r in t0} != {r.id for r in t1}


def test_adding_a_family_does_not_reshuffle_the_others():
    _, t_ab = stratified_split(_records({"a": 20, "b": 20}), 0.25, seed=7)
    _, t_abc = stratified_split(_records({"a": 20, "b": 20, "c": 8}), 0.25, seed=7)
    assert {r.id for r in t_ab} == {r.id for r in t_abc if r.family != "c"}


def test_split_balances_named_colours_and_positions_within_a_family():
    colours = ["red", "green", "blue", "cyan"]
    recs = [
        PromptRecord.create(f"a {c} {shape}" + (f" on the {side}" if side else ""), "color")
        for c in colours
        for shape, side in (("ring", None), ("square", "left"), ("cross", "right"), ("circle", None))
    ]  # 16: each colour 4 times, each side 4 times
    for seed in range(5):
        train, test = stratified_split(recs, 0.25, seed=seed)
        assert len(test) == 4
        assert Counter(c for r in test for c in colours if f" {c} " in r.prompt) == dict.fromkeys(colours, 1)
        assert Counter(side for r in test for side in ("left", "right") if side in r.prompt) == {
            "left": 1,
            "right": 1,
        }


def test_small_families_keep_one_prompt_on_each_side():
    train, test = stratified_split(_records({"a": 2, "b": 1}), 0.1, seed=0)
    assert Counter(r.family for r in test) == {"a": 1}
    assert Counter(r.family for r in train) == {"a": 1, "b": 1}
    train, test = stratified_split(_records({"a": 5}), 0.0, seed=0)
    assert len(train) == 5 and test == []


# ---------------------------------------------------------------------------------- applicability
GENEVAL_META = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}


@pytest.mark.parametrize(
    ("kind", "prompt", "metadata", "expected"),
    [
        ("pickscore", "anything at all", {}, True),
        ("brightness", "x", {}, True),
        ("ocr", 'a sign that says "OPEN"', {}, True),
        ("ocr", "a sign that says 'OPEN'", {}, False),  # OCR convention: double quotes only
        ("ocr", 'empty quotes "" here', {}, False),
        ("ocr", "no text", {}, False),
        ("edge_detail", 'a poster with "sale"', {}, True),
        ("edge_detail", "a poster", {}, False),
        ("color_match", "a red circle", {}, True),
        ("color_match", "a pink circle", {}, False),  # pink is not in the tiny world's palette
        ("color_match", "a reddish circle", {}, False),  # whole words only
        ("geneval", "a photo of a cat", GENEVAL_META, True),
        ("geneval", "a photo of a cat", {}, False),
        ("geneval", "a photo of a cat", {"include": []}, False),
    ],
)
def test_reward_applies(kind, prompt, metadata, expected):
    assert reward_applies(kind, prompt, metadata) is expected


def test_a_kind_without_a_fixed_rule_is_refused():
    # every configured kind's rule is checked against its declaration in tests/test_reward_kinds.py
    with pytest.raises(ValueError, match="no fixed applicability rule"):
        reward_applies("mystery", "x", {})
    with pytest.raises(ValueError, match="no fixed applicability rule"):
        reward_applies("http", "x", {})  # http rewards choose theirs: spec_applies


@pytest.mark.parametrize(
    ("rule", "prompt", "metadata", "expected"),
    [
        ("always", "x", {}, True),
        ("quoted_text", 'say "hi"', {}, True),
        ("quoted_text", "say hi", {}, False),
        ("named_color", "a green box", {}, True),
        ("geneval_metadata", "x", GENEVAL_META, True),
        ("geneval_metadata", "x", {}, False),
    ],
)
def test_spec_applies_uses_the_configured_rule_of_http_rewards(rule, prompt, metadata, expected):
    spec = HttpReward(name="remote", url="http://localhost:1/score", applies_when=rule)
    assert spec_applies(spec, prompt, metadata) is expected


def test_spec_applies_falls_back_to_the_rule_of_the_kind():
    from marble.config import OcrReward

    assert spec_applies(OcrReward(name="ocr"), 'a "sign"', {}) is True
    assert spec_applies(OcrReward(name="ocr"), "a sign", {}) is False
