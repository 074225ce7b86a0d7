"""Min-max and moving-average min-max observers (the baselines every calibrator is judged against).

>>> import torch
>>> o = MinMaxObserver(); o.update(torch.tensor([-1.0, 2.0])); o.update(torch.tensor([5.0]))
>>> o.compute_range()
(-1.0, 5.0)
"""

from __future__ import annotations

from torch import Tensor

from .base import Observer

__all__ = ["MinMaxObserver", "MovingAverageObserver"]


class MinMaxObserver(Observer):
    """The running extremes over every batch seen."""

    name = "minmax"

    def __init__(self, bits: int = 8, signed: bool = False, symmetric: bool = False) -> None:
        super().__init__(bits, signed, symmetric)
        self.lo, self.hi = float("inf"), float("-inf")

    def _update(self, v: Tensor) -> None:
        self.lo = min(self.lo, float(v.min()))
        self.hi = max(self.hi, float(v.max()))

    def compute_range(self) -> tuple[float, float]:
        return self.lo, self.hi


class MovingAverageObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max (``momentum`` is the new batch's weight),
    which damps a single extreme batch.
    """

    name = "moving_average"

    def __init__(
        self, bits: int = 8, signed: bool = False, symmetric: bool = False, momentum: float = 0.1
    ) -> None:
        super().__init__(bits, signed, symmetric)
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum

    def _update(self, v: Tensor) -> None:
        lo, hi = float(v.min()), float(v.max())
        if self.lo == float("inf"):
            self.lo, self.hi = lo, hi
            return
        m = self.momentum
        self.lo = (1 - m) * self.lo + m * lo
        self.hi = (1 - m) * self.hi + m * hi
