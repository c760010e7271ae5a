"""A conservative, tokenizer-free estimate of prompt length in text-encoder tokens.

SD3 encodes every prompt with two CLIP encoders (77 positions including the start and end tokens)
and T5 (`model.max_sequence_length` positions including the end token). Tokens past those limits are
silently cut by the pipeline, so a long OCR prompt can lose the very text it asks to render. The
`prepare` stage refuses (or truncates) such prompts before any compute is spent.

The real tokenizers are not available offline here (and loading SD3.5's T5 tokenizer just to count
would be a heavy dependency for a data stage), so we ESTIMATE the count from a word/punctuation
split modelled on CLIP's pre-tokenizer (`'s|'t|...|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`):

- a run of ASCII letters counts ceil(n / 6) tokens (common words are one BPE token; long or rare
  words split into pieces; SentencePiece T5 splits slightly more often than CLIP);
- every non-ASCII letter counts 1 token (byte-level BPE often needs more, CJK included);
- every digit counts 1 token (CLIP splits numbers digit by digit);
- every punctuation or symbol character counts 1 token (CLIP merges some runs such as "...").

On English prompts this over-counts common long words (e.g. "beautiful" counts 2, CLIP uses 1), so
the estimate errs on the side of flagging a prompt; it is an estimate, not the tokenizer's count.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

CLIP_MAX_TOKENS = 77
"""Positions of SD3's CLIP text encoders, including the start and end tokens."""

LETTERS_PER_TOKEN = 6
"""Estimate: one token per this many ASCII letters of a word (rounded up)."""

# contractions | letter runs | single digits | single other non-space characters
_PIECES = re.compile(r"'(?:s|t|re|ve|m|ll|d)\b|[^\W\d_]+|\d|[^\w\s]|_", re.IGNORECASE)


class TokenLimit(NamedTuple):
    """Content tokens a prompt may use, and where the limit comes from (for messages)."""

    max_tokens: int
    reason: str


def token_limit(max_sequence_length: int) -> TokenLimit:
    """The tighter of CLIP's 77 positions (75 content) and T5's `max_sequence_length` (minus the end token)."""
    clip = CLIP_MAX_TOKENS - 2
    t5 = max_sequence_length - 1
    if t5 < clip:
        return TokenLimit(t5, f"T5 model.max_sequence_length={max_sequence_length} (minus the end token)")
    return TokenLimit(clip, f"CLIP's {CLIP_MAX_TOKENS} positions (minus start and end tokens)")


def _piece_tokens(piece: str) -> int:
    if piece.isascii() and piece.isalpha():
        return math.ceil(len(piece) / LETTERS_PER_TOKEN)
    if piece.isalpha():
        return len(piece)  # non-ASCII letters: one per character (byte-level BPE often uses more)
    return 1


def estimate_tokens(prompt: str) -> int:
    """Estimated content tokens of `prompt` (no start/end tokens); see the module docstring."""
    return sum(_piece_tokens(m.group()) for m in _PIECES.finditer(prompt))


def truncate_to_tokens(prompt: str, max_tokens: int) -> str:
    """The longest prefix of `prompt` whose estimate is at most `max_tokens`, cut at a piece boundary.

    A long word that straddles the limit is cut inside the word (its estimate is per 6 letters).
    """
    used = 0
    end = 0
    for m in _PIECES.finditer(prompt):
        piece = m.group()
        cost = _piece_tokens(piece)
        if used + cost > max_tokens:
            room = max_tokens - used
            if room > 0 and piece.isascii() and piece.isalpha():
                end = m.start() + room * LETTERS_PER_TOKEN
            break
        used += cost
        end = m.end()
    return prompt[:end].rstrip()
