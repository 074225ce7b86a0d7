"""Learned step size quantization (LSQ, Esser et al. 2020): the quantizer's step size is a
parameter trained with the weights. The gradient of the step is scaled by ``1 / sqrt(N * Q_P)``
(``N`` values share the step, ``Q_P`` is the top of the integer range) so that steps and weights
learn at comparable rates.

>>> import torch
>>> x = torch.tensor([0.26, -1.0, 3.0], requires_grad=True)
>>> s = torch.tensor(0.5, requires_grad=True)
>>> y = lsq_quantize(x, s, torch.tensor(0.0), -4, 3, step_gradient_scale(3, 3))
>>> y.detach().tolist()
[0.5, -1.0, 1.5]
>>> y.sum().backward()
>>> x.grad.tolist()  # straight through inside the range, zero where clipped
[1.0, 1.0, 0.0]
"""

from __future__ import annotations

import math

from torch import Tensor

from slimkit.core.affine import fake_quantize

__all__ = ["step_gradient_scale", "scale_gradient", "lsq_quantize", "lsq_init"]


def step_gradient_scale(values_per_step: int, qmax: int) -> float:
    """LSQ's ``g = 1 / sqrt(N * Q_P)``."""
    return 1.0 / math.sqrt(max(values_per_step, 1) * max(qmax, 1))


def scale_gradient(x: Tensor, g: float) -> Tensor:
    """``x`` in the forward pass, its gradient multiplied by ``g`` in the backward pass."""
    return (x - x * g).detach() + x * g


def lsq_quantize(x: Tensor, step: Tensor, zero_point: Tensor, qmin: int, qmax: int, g: float,
                 axis: int | None = None) -> Tensor:
    """Fake-quantize ``x`` with a learned ``step`` (one value, or one per slice along ``axis``).
    The step gets LSQ's gradient, ``x`` the straight-through one; the zero-point stays fixed."""
    s = scale_gradient(step.clamp_min(1e-8), g)
    return fake_quantize(x, s, zero_point, qmin, qmax, axis)


def lsq_init(x: Tensor, qmax: int) -> Tensor:
    """The paper's initial step, ``2 * mean|x| / sqrt(Q_P)`` (slimkit starts from calibrated
    scales instead, and uses this only where nothing was observed)."""
    return (2 * x.detach().abs().mean() / math.sqrt(max(qmax, 1))).clamp_min(1e-8)
