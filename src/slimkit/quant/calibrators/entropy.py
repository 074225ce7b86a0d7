"""KL-divergence (entropy) calibration, TensorRT style (Migacz 2017, "8-bit Inference with
TensorRT"): pick the clipping range whose quantized distribution Q loses the least information
about the reference distribution P, ``argmin KL(P || Q)``.

For each candidate range: P is the histogram restricted to the range with the mass outside it
folded into the edge bins; Q merges the *unfolded* slice into ``2**bits`` levels and spreads each
level's mass evenly over the bins that were non-empty in P. The folded mass is what Q lacks, so
clipping is paid for and over-clipping loses. TensorRT searches thresholds on ``|x|`` with 128
levels; here the search runs on the two-sided histogram with ``2**bits`` levels, which is the same
for symmetric data and also serves one-sided (post-ReLU) activations. Exact zeros are left out of
the histogram (see ``_update``): with them, a post-ReLU layer's range collapsed and a digits CNN lost
13 to 75 points of accuracy; without them it matches min-max and percentile.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from .base import Observer
from .histogram import StreamingHistogram

__all__ = ["EntropyObserver", "kl_of_clipping"]


def kl_of_clipping(counts: np.ndarray, start: int, stop: int, levels: int) -> float:
    """``KL(P || Q)`` for the histogram ``counts`` clipped to bins ``[start, stop)``."""
    sliced = counts[start:stop].astype(np.float64)
    p = sliced.copy()
    p[0] += counts[:start].sum()
    p[-1] += counts[stop:].sum()
    nonzero = p > 0
    q = np.zeros_like(p)
    for chunk in np.array_split(np.arange(p.size), min(levels, p.size)):
        nz = nonzero[chunk]
        if nz.any():
            q[chunk[nz]] = sliced[chunk].sum() / nz.sum()
    p_sum, q_sum = p.sum(), q.sum()
    if p_sum == 0 or q_sum == 0:
        return float("inf")
    p, q = p / p_sum, q / q_sum
    q = np.where(nonzero & (q == 0), 1e-4 / p.size, q)  # smoothing: P's mass where Q has none
    m = nonzero
    return float(np.sum(p[m] * np.log(p[m] / q[m])))


class EntropyObserver(Observer):
    name = "entropy"

    def __init__(
        self,
        bits: int = 8,
        signed: bool = False,
        symmetric: bool = False,
        bins: int = 2048,
        candidates: int = 96,
    ) -> None:
        super().__init__(bits, signed, symmetric)
        self.hist = StreamingHistogram(bins)
        self.candidates = candidates

    def _update(self, v: Tensor) -> None:
        # Exact zeros (ReLU outputs, padding) are representable whatever the range, since the
        # zero-point is an integer; in the histogram they are a point mass that Q spreads over a
        # level's bins, which would make every range but a tiny one look lossy. Leave them out.
        self.hist.update(v[v != 0])

    def compute_range(self) -> tuple[float, float]:
        h = self.hist
        if h.total == 0:  # every value seen was exactly zero
            return 0.0, 0.0
        levels = self.qmax - self.qmin + 1
        edges = h.edges
        width = (h.hi - h.lo) / h.bins
        best, best_range = float("inf"), (h.lo, h.hi)
        min_fraction = min(1.0, 2.0 * levels / h.bins)
        for lo, hi in h.candidate_ranges(self.candidates, min_fraction):
            start = int(np.clip(np.floor((lo - h.lo) / width), 0, h.bins - 1))
            stop = int(np.clip(np.ceil((hi - h.lo) / width), start + 1, h.bins))
            if stop - start < levels and (start, stop) != (0, h.bins):
                continue
            kl = kl_of_clipping(h.counts, start, stop, levels)
            if kl < best:
                best, best_range = kl, (float(edges[start]), float(edges[stop]))
        lo, hi = best_range
        if self.symmetric:
            amax = max(-lo, hi)
            return -amax, amax
        return lo, hi
