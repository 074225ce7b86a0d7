"""MSE calibration: the clipping range that minimizes the expected squared quantization error,
estimated on the histogram (each bin's mass at its center), searched over shrinking ranges.

Clipping trades rounding error inside the range against clipping error outside it (Banner et al.
2019, "Post-training 4-bit quantization", eq. 4 is the Laplace closed form of the same trade-off).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from .base import Observer
from .histogram import StreamingHistogram

__all__ = ["MSEObserver", "expected_sq_error"]


def expected_sq_error(
    centers: np.ndarray, counts: np.ndarray, ranges: np.ndarray, qmin: int, qmax: int
) -> np.ndarray:
    """Expected squared error of quantizing mass ``counts`` at ``centers`` with each range, [n]."""
    lo = np.minimum(ranges[:, :1], 0.0)  # [n, 1]
    hi = np.maximum(ranges[:, 1:], 0.0)
    scale = np.maximum((hi - lo) / (qmax - qmin), 1e-12)
    zp = np.clip(qmin - np.round(lo / scale), qmin, qmax)
    q = np.clip(np.round(centers[None, :] / scale) + zp, qmin, qmax)  # [n, bins]
    err = ((q - zp) * scale - centers[None, :]) ** 2
    return (err * counts[None, :]).sum(1)


class MSEObserver(Observer):
    name = "mse"

    def __init__(
        self,
        bits: int = 8,
        signed: bool = False,
        symmetric: bool = False,
        bins: int = 2048,
        candidates: int = 128,
    ) -> None:
        super().__init__(bits, signed, symmetric)
        self.hist = StreamingHistogram(bins)
        self.candidates = candidates

    def _update(self, v: Tensor) -> None:
        self.hist.update(v)

    def compute_range(self) -> tuple[float, float]:
        ranges = self.hist.candidate_ranges(self.candidates)
        if self.symmetric:
            amax = np.maximum(-ranges[:, 0], ranges[:, 1])
            ranges = np.stack([-amax, amax], 1)
        err = expected_sq_error(
            self.hist.centers, self.hist.counts, ranges, self.qmin, self.qmax
        )
        lo, hi = ranges[int(np.argmin(err))]
        return float(lo), float(hi)
