"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight
Equalization and Bias Correction", sec. 4.2; the empirical variant of their appendix): rounding the
weights shifts a layer's expected output by ``E[(W_q - W) x]``; measuring that shift per output
channel on calibration inputs and subtracting it from the bias removes the systematic part of the
error, which otherwise accumulates through the network.

>>> import torch
>>> x = torch.randn(64, 3) + 2.0                        # inputs with a non-zero mean
>>> w, wq = torch.eye(3), torch.eye(3) * 1.1            # quantization scaled the weights up by 10%
>>> shift = output_shift(lambda inp, d: inp @ d.t(), w, wq, [x], channel_dim=-1)
>>> torch.allclose(shift, 0.1 * x.mean(0))
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["output_shift", "output_shift_from_float"]


def _channel_mean(forward: Callable[[Tensor, Tensor], Tensor], inputs: Sequence[Tensor], w: Tensor,
                  channel_dim: int) -> Tensor:
    """Mean per output channel of ``forward(x, w)`` over every position of every input."""
    total, count = None, 0
    for x in inputs:
        d = forward(x, w)
        d = d.movedim(channel_dim, -1).reshape(-1, d.shape[channel_dim])
        total = d.sum(0) if total is None else total + d.sum(0)
        count += d.shape[0]
    assert total is not None
    return total / count


@torch.no_grad()
def output_shift(forward: Callable[[Tensor, Tensor], Tensor], weight: Tensor, quantized: Tensor,
                 inputs: Sequence[Tensor], channel_dim: int = 1) -> Tensor:
    """Mean per output channel of ``forward(x, quantized - weight)`` over ``inputs`` (``forward`` is
    the layer without its bias, linear in the weights): subtract it from the bias."""
    if not inputs:
        raise ValueError("bias correction needs calibration inputs for the layer")
    return _channel_mean(forward, inputs, quantized - weight, channel_dim)


@torch.no_grad()
def output_shift_from_float(forward: Callable[[Tensor, Tensor], Tensor], weight: Tensor, quantized: Tensor,
                            inputs: Sequence[Tensor], float_inputs: Sequence[Tensor], channel_dim: int = 1) -> Tensor:
    """Mean per output channel of ``forward(x_q, quantized) - forward(x_f, weight)``: the shift of
    the layer's output from the float model's own (``float_inputs``), the error its quantized
    inputs carry included, so that subtracting it from the bias re-centres the quantized model on
    the float one layer by layer."""
    if not inputs or len(inputs) != len(float_inputs):
        raise ValueError("bias correction from the float model needs the layer's inputs on both models, paired")
    return _channel_mean(forward, inputs, quantized, channel_dim) - _channel_mean(forward, float_inputs, weight,
                                                                                  channel_dim)
