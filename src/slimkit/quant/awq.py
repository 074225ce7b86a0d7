"""AWQ (Lin et al. 2024), activation-aware weight quantization: the few input channels that carry
large activations matter most, so scale their weight columns up by ``s`` before rounding (they
get a finer grid relative to their size) and divide the input by ``s`` at run time, which leaves
the float function unchanged. ``s = mean|x|^alpha`` per input channel, with ``alpha`` searched on
a grid to minimize the layer's output error on calibration inputs (alpha = 0 is round to nearest).

>>> import torch
>>> torch.manual_seed(0)
<torch._C.Generator object at ...>
>>> x = torch.randn(256, 64) * torch.where(torch.arange(64) < 4, 20.0, 1.0)  # 4 salient channels
>>> w = torch.randn(32, 64)
>>> s, alpha, errors = awq_scales(w, x, bits=4, group_size=32)
>>> alpha > 0 and errors[alpha] < 0.8 * errors[0.0]
True
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimkit.quant.weight_only import dequantize_groups, rtn_groups

__all__ = ["awq_scales", "output_error_of"]


def output_error_of(w: Tensor, w_hat: Tensor, x: Tensor) -> float:
    """Mean squared error of the layer's outputs ``x @ w^T`` when ``w`` becomes ``w_hat``."""
    return float(((x @ (w_hat - w).T) ** 2).mean())


@torch.no_grad()
def awq_scales(w: Tensor, x: Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True,
               grid: int = 20) -> tuple[Tensor, float, dict[float, float]]:
    """Per-input-channel scales for ``w`` ``[out, in]`` from inputs ``x`` ``[n, in]``. Returns the
    scales, the chosen alpha and the output error at each alpha tried."""
    x = x.detach().reshape(-1, x.shape[-1]).float()
    w = w.detach().float()
    if x.shape[0] == 0:
        raise ValueError("AWQ needs calibration inputs; the layer saw none")
    act = x.abs().mean(0).clamp_min(1e-8)
    errors: dict[float, float] = {}
    best: tuple[float, float, Tensor] | None = None
    for i in range(grid):
        alpha = round(i / grid, 4)
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centred around 1, as the paper's code does
        w_hat = dequantize_groups(*rtn_groups(w * s, bits, group_size, symmetric)) / s
        errors[alpha] = output_error_of(w, w_hat, x)
        if best is None or errors[alpha] < best[0]:
            best = (errors[alpha], alpha, s)
    assert best is not None
    return best[2], best[1], errors
