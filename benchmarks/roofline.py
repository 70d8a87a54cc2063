"""What the decoding benchmarks share: the machine's memory bandwidth, measured in the run.

Decoding at batch 1 reads every weight once per token, so weight bytes ÷ bandwidth is the
least time a step can take (its roofline); the benchmarks measure the bandwidth in every
round, since these machines drift between fast and slow phases.
"""

from __future__ import annotations

import time

import torch


def memory_bandwidth(big: torch.Tensor, repeats: int = 5) -> float:
    """GB/s of a large-array read (``torch.sum`` over ``big``, 1 GB: beyond any cache), best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        big.sum()
        best = min(best, time.perf_counter() - t)
    return big.numel() * big.element_size() / best / 1e9
