"""What a model download is: a repo (or local directory), a revision and the files to take from it."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

WEIGHT_PATTERNS = ("*.json", "*.txt", "*.model", "*.safetensors", "*.bin")
"""Files of a transformers checkpoint worth caching (no flax/tf weights). `*.bin` is dropped by the cache
when the repo also has safetensors."""


@dataclass(frozen=True)
class Artifact:
    """One model repo (or local directory) a stage loads, pinned to a revision.

    allow_patterns: glob patterns of the files to snapshot (None = every file).
    """

    id: str
    revision: str | None
    allow_patterns: tuple[str, ...] | None = WEIGHT_PATTERNS

    def matches(self, rel: str) -> bool:
        """Whether the repo file `rel` (POSIX path) is part of this artifact."""
        return self.allow_patterns is None or any(fnmatch.fnmatch(rel, p) for p in self.allow_patterns)
