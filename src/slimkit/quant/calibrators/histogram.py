"""One streaming histogram, shared by the percentile, KL/entropy and MSE calibrators.

The histogram has a fixed number of equal-width bins over a range that grows as data arrives: when
a batch falls outside the current range, the counts are moved onto the wider grid by linear
interpolation of the cumulative distribution (counts are assumed uniform inside a bin). This keeps
memory constant however many batches stream through.

>>> import torch
>>> h = StreamingHistogram(bins=8)
>>> h.update(torch.arange(9.0))
>>> h.counts.tolist()
[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0]
>>> h.update(torch.tensor([16.0]))  # out of range: the grid doubles, the mass is kept
>>> h.hi, float(h.counts.sum())
(16.0, 10.0)
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["StreamingHistogram"]


class StreamingHistogram:
    def __init__(self, bins: int = 2048) -> None:
        if bins < 8:
            raise ValueError(f"bins must be at least 8, got {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.lo = self.hi = 0.0
        self.total = 0.0

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2

    def update(self, x: Tensor) -> None:
        v = x.detach().reshape(-1).double().cpu().numpy()
        if v.size == 0:
            return
        vmin, vmax = float(v.min()), float(v.max())
        if self.total == 0:
            self.lo, self.hi = vmin, vmax
            if self.hi <= self.lo:
                pad = max(abs(self.lo) * 1e-3, 1e-8)
                self.lo, self.hi = self.lo - pad, self.hi + pad
        elif vmin < self.lo or vmax > self.hi:
            self._rebin(min(vmin, self.lo), max(vmax, self.hi))
        c, _ = np.histogram(v, bins=self.bins, range=(self.lo, self.hi))
        self.counts += c
        self.total += v.size

    def _rebin(self, lo: float, hi: float) -> None:
        cdf = np.concatenate([[0.0], np.cumsum(self.counts)])
        new_edges = np.linspace(lo, hi, self.bins + 1)
        new_cdf = np.interp(new_edges, self.edges, cdf, left=0.0, right=cdf[-1])
        self.counts = np.diff(new_cdf)
        self.lo, self.hi = lo, hi

    def quantile(self, q: float) -> float:
        """Value below which a fraction ``q`` of the observed mass lies."""
        if self.total == 0:
            raise ValueError("the histogram is empty")
        cdf = np.concatenate([[0.0], np.cumsum(self.counts)]) / self.total
        return float(np.interp(q, cdf, self.edges))

    def candidate_ranges(self, n: int = 128, min_fraction: float = 0.01) -> np.ndarray:
        """``n`` clipping ranges ``[lo, hi]`` shrinking the observed range towards zero, shape [n, 2].
        The full range is always the first candidate, so a search over them never does worse than
        min-max on the histogram's own measure.
        """
        alphas = np.geomspace(1.0, min_fraction, n)
        return np.stack([np.minimum(self.lo, 0.0) * alphas, np.maximum(self.hi, 0.0) * alphas], 1)
