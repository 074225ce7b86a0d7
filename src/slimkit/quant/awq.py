"""AWQ (Lin et al. 2024), activation-aware weight quantization: the few input channels that carry
large activations matter most, so scale their weight columns up by ``s`` before rounding (they
get a finer grid relative to their size) and divide the input by ``s`` at run time, which leaves
the float function unchanged. ``s = mean|x|^alpha`` per input channel, with ``alpha`` searched on
a grid to minimize the layer's output error on calibration inputs (alpha = 0 is round to nearest).

Then, as the paper's released code does, ``awq_clip`` searches each group's range: shrinking a
group's grid (its scale times ``r`` for ``r`` from 1 down to 0.5) saturates its few largest
weights but rounds the rest more finely; the ``r`` kept for each output row and group is the one
with the smallest error in that group's share of the layer's output.

>>> import torch
>>> torch.manual_seed(0)
<torch._C.Generator object at ...>
>>> x = torch.randn(256, 64) * torch.where(torch.arange(64) < 4, 20.0, 1.0)  # 4 salient channels
>>> w = torch.randn(32, 64)
>>> s, alpha, errors = awq_scales(w, x, bits=4, group_size=32)
>>> alpha > 0 and errors[alpha] < 0.8 * errors[0.0]
True
>>> from slimkit.quant.weight_only import dequantize_groups, group_qparams, quantize_groups
>>> def err(scale, zp): return output_error_of(w * s, dequantize_groups(quantize_groups(w * s, scale, zp, 4), scale, zp), x / s)
>>> err(*awq_clip(w * s, x / s, bits=4, group_size=32)) < err(*group_qparams(w * s, 4, 32))
True
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimkit.quant.weight_only import dequantize_groups, group_qparams, rtn_groups

__all__ = ["awq_scales", "awq_clip", "output_error_of"]


def output_error_of(w: Tensor, w_hat: Tensor, x: Tensor) -> float:
    """Mean squared error of the layer's outputs ``x @ w^T`` when ``w`` becomes ``w_hat``."""
    return float(((x @ (w_hat - w).T) ** 2).mean())


def _scaled_error(w: Tensor, s: Tensor, x: Tensor, bits: int, group_size: int, symmetric: bool, rows: int) -> float:
    """``output_error_of`` for round to nearest of ``w * s`` (divided back by ``s``), ``rows`` output
    rows at a time: a large layer's scaled and rounded copies are slices of it."""
    if w.shape[0] <= rows:
        return output_error_of(w, dequantize_groups(*rtn_groups(w * s, bits, group_size, symmetric)) / s, x)
    total = 0.0
    for r in range(0, w.shape[0], rows):
        wr = w[r:r + rows]
        w_hat = dequantize_groups(*rtn_groups(wr * s, bits, group_size, symmetric)) / s
        total += float(((x @ (w_hat - wr).T) ** 2).sum())
    return total / (x.shape[0] * w.shape[0])


@torch.no_grad()
def awq_scales(w: Tensor, x: Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True,
               grid: int = 20, rows: int = 1024) -> tuple[Tensor, float, dict[float, float]]:
    """Per-input-channel scales for ``w`` ``[out, in]`` from inputs ``x`` ``[n, in]``. Returns the
    scales, the chosen alpha and the output error at each alpha tried. A layer of more than
    ``rows`` outputs is measured ``rows`` at a time (the same error, in bounded memory)."""
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
        errors[alpha] = _scaled_error(w, s, x, bits, group_size, symmetric, rows)
        if best is None or errors[alpha] < best[0]:
            best = (errors[alpha], alpha, s)
    assert best is not None
    return best[2], best[1], errors


@torch.no_grad()
def awq_clip(w: Tensor, x: Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True,
             steps: int = 20, max_shrink: float = 0.5, rows: int = 512, out_rows: int = 1024) -> tuple[Tensor, Tensor]:
    """Each group's scale and zero-point (``[out, in // group_size]``, as ``group_qparams`` gives)
    with its range shrunk by the ratio in ``[1 - max_shrink, 1]`` (``steps`` of them) that
    minimizes the error of that group's contribution to the outputs, ``x[:, g] @ w[o, g]^T``, on up
    to ``rows`` rows of ``x`` ``[n, in]`` taken evenly. Ratio 1 is round to nearest, kept where
    nothing does better. The zero-point is the unshrunk one: shrinking ``[lo, hi]`` about zero
    leaves it in place. Each output row's choice is its own: they are searched ``out_rows`` at a time."""
    if not 0.0 <= max_shrink < 1.0 or steps < 1:
        raise ValueError(f"awq_clip needs 0 <= max_shrink < 1 and steps >= 1, got {max_shrink} and {steps}")
    x = x.detach().reshape(-1, x.shape[-1]).float()
    if x.shape[0] == 0:
        raise ValueError("AWQ's clipping search needs calibration inputs; the layer saw none")
    w = w.detach().float()
    x = x[torch.linspace(0, x.shape[0] - 1, min(rows, x.shape[0])).long()]
    if w.shape[0] > out_rows:
        parts = [awq_clip(w[r:r + out_rows], x, bits, group_size, symmetric, steps, max_shrink, rows, out_rows)
                 for r in range(0, w.shape[0], out_rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    scale, zp = group_qparams(w, bits, group_size, symmetric)
    wg = w.reshape(w.shape[0], -1, group_size)  # [out, groups, size]
    xg = x.reshape(x.shape[0], -1, group_size).transpose(0, 1)  # [groups, n, size]
    # sum over the rows of (x_g . dw_og)^2 is dw_og^T (x_g^T x_g) dw_og: each group's Gram matrix
    # [size, size] in place of the [groups, n, out] products (a quarter of the arithmetic at n = 512)
    gram = torch.bmm(xg.transpose(1, 2), xg)  # [groups, size, size]
    best_err = torch.full_like(scale, float("inf"))
    best = torch.ones_like(scale)
    for r in torch.linspace(1.0, 1.0 - max_shrink, steps).tolist():
        s = scale * r
        q = torch.clamp(torch.round(wg / s[..., None]) + zp[..., None], 0, 2**bits - 1)
        dw = (q - zp[..., None]) * s[..., None] - wg
        del q
        err = (torch.einsum("ogi,gij->ogj", dw, gram) * dw).sum(-1)  # [out, groups]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return scale * best, zp
