"""Percentile calibration: clip the range at the ``percentile``-th value of each tail.

>>> import torch
>>> o = PercentileObserver(percentile=90.0); o.update(torch.arange(101.0))
>>> [round(v, 1) for v in o.compute_range()]
[10.0, 90.0]
"""

from __future__ import annotations

from torch import Tensor

from .base import Observer
from .histogram import StreamingHistogram

__all__ = ["PercentileObserver"]


class PercentileObserver(Observer):
    name = "percentile"

    def __init__(
        self,
        bits: int = 8,
        signed: bool = False,
        symmetric: bool = False,
        percentile: float = 99.99,
        bins: int = 2048,
    ) -> None:
        super().__init__(bits, signed, symmetric)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile
        self.hist = StreamingHistogram(bins)

    def _update(self, v: Tensor) -> None:
        self.hist.update(v)

    def compute_range(self) -> tuple[float, float]:
        p = self.percentile / 100.0
        return self.hist.quantile(1.0 - p), self.hist.quantile(p)
