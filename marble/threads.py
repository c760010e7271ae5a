"""Pinning torch's intra-op thread count for a block of work.

CPU kernels split their reductions by thread, so the thread count changes results in the last bits
(the tiny model's build) and timings (the benchmarks): both pin it and restore the caller's setting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads; the previous count is restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
