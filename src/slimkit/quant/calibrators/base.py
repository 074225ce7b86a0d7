"""The observer interface: stream batches in with ``update``, read a clipping range out.

An observer sees activations during calibration and proposes the real range ``[lo, hi]`` that the
quantization grid should cover. Non-finite values are rejected (NaN) or left out (+-inf, which only
masking produces and which must not stretch the range); the caller names the layer at fault.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimkit.core.affine import choose_qparams, qrange

__all__ = ["Observer", "finite_values"]


def finite_values(x: Tensor) -> Tensor:
    """The finite values of ``x`` as a flat float tensor; NaN is an error."""
    x = x.detach().reshape(-1).float()
    if torch.isnan(x).any():
        raise ValueError("activation holds NaN values")
    if not torch.isfinite(x).all():
        x = x[torch.isfinite(x)]
    return x


class Observer:
    """Base class. ``bits``/``signed``/``symmetric`` describe the target integer grid."""

    name = "base"

    def __init__(self, bits: int = 8, signed: bool = False, symmetric: bool = False) -> None:
        self.bits, self.signed, self.symmetric = bits, signed, symmetric
        self.qmin, self.qmax = qrange(bits, signed)
        self.seen = 0

    def update(self, x: Tensor) -> None:
        v = finite_values(x)
        if v.numel() == 0:
            return
        self.seen += v.numel()
        self._update(v)

    def _update(self, v: Tensor) -> None:
        raise NotImplementedError

    def compute_range(self) -> tuple[float, float]:
        raise NotImplementedError

    def qparams(self) -> tuple[Tensor, Tensor]:
        if self.seen == 0:
            raise ValueError(f"{self.name} observer saw no finite values during calibration")
        lo, hi = self.compute_range()
        return choose_qparams(
            torch.tensor(lo), torch.tensor(hi), self.bits, self.signed, self.symmetric
        )
