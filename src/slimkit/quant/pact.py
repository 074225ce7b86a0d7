"""PACT (Choi et al. 2018): a learned clipping level ``alpha`` for activations.

The activation is clipped to ``[lo, alpha]`` and quantized on a grid spanning that interval. As in
the paper the quantization step itself is straight-through, so ``alpha`` learns only from the
clipping: its gradient is the sum of the upstream gradients where ``x >= alpha``. The paper keeps
``alpha`` small with L2 regularization; here that is the optimizer's weight decay. ``lo`` is the
calibrated lower end (0 after a ReLU), kept fixed so the zero-point is a fixed integer.

>>> import torch
>>> alpha = torch.tensor(2.0, requires_grad=True)
>>> x = torch.tensor([-1.0, 0.3, 0.9, 5.0])
>>> y = pact_quantize(x, alpha, torch.tensor(0.0), 0, 3)
>>> [round(v, 4) for v in y.tolist()]
[0.0, 0.0, 0.6667, 2.0]
>>> y.sum().backward(); alpha.grad.item()
1.0
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimkit.core.affine import fake_quantize

__all__ = ["pact_qparams", "pact_quantize"]


def pact_qparams(alpha: Tensor, lo: Tensor, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """The grid over ``[lo, alpha]`` (``lo <= 0 < alpha``): step and integer zero-point."""
    hi = alpha.detach().clamp_min(1e-6)
    lo = lo.detach().clamp_max(0.0)
    scale = (hi - lo) / float(qmax - qmin)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


def pact_quantize(x: Tensor, alpha: Tensor, lo: Tensor, qmin: int, qmax: int) -> Tensor:
    """``quantize(clip(x, lo, alpha))`` with PACT's gradients (see the module docstring)."""
    clipped = torch.minimum(torch.maximum(x, lo.detach()), alpha)
    scale, zero_point = pact_qparams(alpha, lo, qmin, qmax)
    q = fake_quantize(clipped.detach(), scale, zero_point, qmin, qmax)
    return clipped + (q - clipped).detach()
