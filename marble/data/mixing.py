"""Mixing sources into one prompt set: token limits, duplicates, and the stratified train/test split."""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Sequence

from marble.config import DataConfig
from marble.data.records import PromptRecord
from marble.data.sources import RawPrompt
from marble.data.tiny_world import named_colors, named_position
from marble.data.tokens import estimate_tokens, token_limit, truncate_to_tokens
from marble.data.validation import data_error

log = logging.getLogger(__name__)


def apply_token_limit(
    prompts: Sequence[RawPrompt], cfg: DataConfig, max_sequence_length: int
) -> tuple[list[RawPrompt], int]:
    """Refuse (DataError) or truncate prompts whose estimated token count exceeds the encoders' limit.

    Returns the prompts (truncated ones shortened) and how many were truncated. The estimate is
    documented in `marble.data.tokens`; its limit is the tighter of CLIP's and T5's.
    """
    limit = token_limit(max_sequence_length)
    out: list[RawPrompt] = []
    truncated = 0
    for p in prompts:
        n = estimate_tokens(p.prompt)
        if n <= limit.max_tokens:
            out.append(p)
            continue
        if cfg.on_overlong == "reject":
            raise data_error(
                p.where,
                "prompt",
                f"about {n} tokens (estimate), over the limit of {limit.max_tokens} from {limit.reason}; "
                "shorten it or set data.on_overlong=truncate",
            )
        truncated += 1
        out.append(p._replace(prompt=truncate_to_tokens(p.prompt, limit.max_tokens)))
    if truncated:
        log.warning("truncated %d prompt(s) to ~%d tokens (%s)", truncated, limit.max_tokens, limit.reason)
    return out, truncated


def mix(prompts: Sequence[RawPrompt], cfg: DataConfig) -> tuple[list[tuple[PromptRecord, RawPrompt]], int]:
    """Records in source order with duplicates (same normalised prompt) refused or dropped per config.

    With `on_duplicate=drop` the first occurrence is kept; a duplicate whose metadata differs from
    the kept one is always refused, because keeping either would silently change what a reward scores.
    Returns (record, origin) pairs and the number of duplicates dropped.
    """
    seen: dict[str, tuple[PromptRecord, RawPrompt]] = {}
    out: list[tuple[PromptRecord, RawPrompt]] = []
    dropped = 0
    for p in prompts:
        rec = PromptRecord.create(p.prompt, p.family, p.metadata)
        first = seen.get(rec.prompt)
        if first is None:
            seen[rec.prompt] = (rec, p)
            out.append((rec, p))
            continue
        if cfg.on_duplicate == "reject":
            raise data_error(
                p.where,
                "prompt",
                f"duplicate of {first[1].where} ({rec.prompt[:60]!r}); remove it or set data.on_duplicate=drop",
            )
        if first[0].metadata != rec.metadata:
            raise data_error(
                p.where, "metadata", f"duplicate prompt of {first[1].where} with different metadata"
            )
        dropped += 1
    if dropped:
        log.info("dropped %d duplicate prompt(s) (data.on_duplicate=drop)", dropped)
    return out, dropped


def _family_rng(seed: int, family: str) -> random.Random:
    # One generator per family, so adding a family never reshuffles the others' splits.
    digest = hashlib.sha256(f"{seed}:{family}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def scored_attributes(prompt: str) -> tuple[str, ...]:
    """The attribute values a prompt names that specialist rewards score ("color:red", "position:left").

    The split balances them so that an image change that ignores the prompt cannot pass for following
    it: with every colour (position) equally often on each side, the tiny world's zero-sum colour and
    position rewards average to zero on each side for any such change (docs/tiny-world.md).
    """
    colors = tuple(f"color:{c}" for c in dict.fromkeys(named_colors(prompt)))
    position = named_position(prompt)
    return colors + ((f"position:{position}",) if position else ())


def _balanced_pick(ids: list[str], attrs: dict[str, tuple[str, ...]], n_test: int) -> list[str]:
    """`n_test` of `ids` (in their given, shuffled order) whose attribute counts follow the family's.

    Greedy on the squared gap between each attribute's test count and its share (count in the family
    x n_test / n): each pick takes the first id whose attributes reduce it most (picking attribute a
    changes the gap by 1 - 2 (share_a - count_a)). Ids without attributes all score 0, so a family
    without any takes the first n_test ids, exactly as a plain shuffled split would.
    """
    total: Counter[str] = Counter(a for i in ids for a in attrs[i])
    share = {a: c * n_test / len(ids) for a, c in total.items()}
    picked: Counter[str] = Counter()
    remaining, chosen = list(ids), []
    for _ in range(n_test):
        gain = [sum(2 * (share[a] - picked[a]) - 1 for a in attrs[i]) for i in remaining]
        best = max(range(len(remaining)), key=lambda k: (gain[k], -k))
        chosen.append(remaining.pop(best))
        picked.update(attrs[chosen[-1]])
    return chosen


def stratified_split(
    records: Sequence[PromptRecord], test_fraction: float, seed: int
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Split per family: round(n * test_fraction) prompts of each family go to test, balanced within the
    family on `scored_attributes` (each named colour and position on each side in proportion).

    A family with at least two prompts keeps at least one on each side when `test_fraction > 0`.
    Deterministic in (records, test_fraction, seed); both halves keep the input order.
    """
    by_family: dict[str, list[str]] = defaultdict(list)
    attrs: dict[str, tuple[str, ...]] = {}
    for r in records:
        by_family[r.family].append(r.id)
        attrs[r.id] = scored_attributes(r.prompt)
    test_ids: set[str] = set()
    for family in sorted(by_family):
        ids = sorted(by_family[family])  # input order must not matter, only the set of ids
        n = len(ids)
        n_test = round(n * test_fraction)
        if test_fraction > 0 and n >= 2:
            n_test = min(max(n_test, 1), n - 1)
        _family_rng(seed, family).shuffle(ids)
        test_ids.update(_balanced_pick(ids, attrs, n_test))
    train = [r for r in records if r.id not in test_ids]
    test = [r for r in records if r.id in test_ids]
    return train, test
