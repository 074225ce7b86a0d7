"""The weight grid at low bit widths, clipped: each output channel's scale is a ratio of its largest
magnitude (which can spend most of a 15-level grid on a few outlying weights), chosen by one of two
errors:

- ``output_clip_scale``: the error the rounded weights cause in the channel's output on the
  calibration inputs. The grid for round-to-nearest: on the digits MLP at 4 bits it beats the
  largest-magnitude grid (``tests/quant/test_low_bit.py``), where the weights' own error fell
  below it (measured ad hoc: 22.6 against 27.0 dB).
- ``mse_weight_scale``: the rounded weights' own squared error, no data needed. The grid the
  ``w4a8-adaround`` preset starts AdaRound from: on EfficientNet-Lite1 W4A8 AdaRound reached more
  from it than from the output-error grid, which is tuned to nearest rounding (measured ad hoc on
  64 crops: 0.81 against 0.69 top-1 agreement; the preset's result is in
  benchmarks/results/ptq_real_cnn.md).

Weights clipped to the grid's end keep the chosen scale recoverable from the rounded weights alone
(their largest magnitude is ``qmax * scale``), so a quantized layer rebuilt from them lands on the
same integers.

>>> import torch
>>> torch.manual_seed(0)
<torch._C.Generator object at ...>
>>> w, x = torch.randn(4, 64), torch.randn(512, 64)
>>> w[:, 0] = 8.0  # one outlier weight per channel, on an input that is small
>>> x[:, 0] *= 0.01
>>> out = lambda inputs, weight: inputs @ weight.t()
>>> s, lo, hi = output_clip_scale(w, 4, True, out, [x])
>>> full = w.abs().amax(1) / hi
>>> def err(scale): return float((out(x, torch.round(w / scale[:, None]).clamp(lo, hi) * scale[:, None] - w) ** 2).sum())
>>> bool((s < full).all()) and err(s) < err(full)
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .modules import weight_qparams

__all__ = ["output_clip_scale", "mse_weight_scale", "RATIOS"]

RATIOS = torch.linspace(0.5, 1.0, 21)  # shares of the channel's largest magnitude tried as the grid's end


def output_clip_scale(weight: Tensor, bits: int, per_channel: bool, forward: Callable[[Tensor, Tensor], Tensor],
                      inputs: Sequence[Tensor], channel_dim: int = -1) -> tuple[Tensor, int, int]:
    """``(scale, qmin, qmax)`` as ``weight_qparams``, each output channel's scale (one shared when
    not ``per_channel``) the ratio of ``RATIOS`` whose rounding error moves ``forward(x, w)``'s
    channel (along ``channel_dim``) least, summed over ``inputs``."""
    scale, lo, hi = weight_qparams(weight, bits, per_channel)
    w = weight.detach().float()
    shape = [-1] + [1] * (w.dim() - 1)
    best, err = scale.clone(), torch.full_like(scale, float("inf"))
    with torch.no_grad():
        for r in RATIOS:
            s = (scale * r).clamp_min(1e-12)
            delta = torch.clamp(torch.round(w / s.reshape(shape)), lo, hi) * s.reshape(shape) - w
            e = sum(forward(x, delta).movedim(channel_dim, -1).reshape(-1, w.shape[0]).double().pow(2).sum(0)
                    for x in inputs)
            e = torch.as_tensor(e, dtype=torch.float64)
            if not per_channel:
                e = e.sum().expand(w.shape[0])
            better = e < err.double()
            best = torch.where(better, s, best)
            err = torch.where(better, e.float(), err)
    return best, lo, hi


def mse_weight_scale(weight: Tensor, bits: int, per_channel: bool = True) -> tuple[Tensor, int, int]:
    """``(scale, qmin, qmax)`` as ``weight_qparams``, each output channel's scale (one shared when
    not ``per_channel``) the ratio of ``RATIOS`` minimising the rounded weights' squared error."""
    scale, lo, hi = weight_qparams(weight, bits, per_channel)
    w = weight.detach().float().reshape(weight.shape[0], -1)
    best, err = scale.clone(), torch.full_like(scale, float("inf"))
    for r in RATIOS:
        s = (scale * r).clamp_min(1e-12)
        e = ((torch.round(w / s[:, None]).clamp(lo, hi) * s[:, None] - w) ** 2).sum(1)
        if not per_channel:
            e = e.sum().expand(w.shape[0])
        better = e < err
        best, err = torch.where(better, s, best), torch.where(better, e, err)
    return best, lo, hi
