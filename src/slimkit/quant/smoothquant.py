"""SmoothQuant (Xiao et al. 2023): a few input channels of a transformer's Linear layers carry
activations tens of times larger than the rest, so one per-tensor INT8 grid for the activation
wastes its levels on them. Divide each input channel ``j`` by ``s_j`` at run time and multiply the
weight's column ``j`` by it, which leaves the float function unchanged and moves the difficulty
into the weights, whose per-channel grids absorb it:

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

``alpha`` (0 to 1) sets how much moves. Smoothing can also hurt a layer whose inputs have no
outliers, so ``smooth_search`` measures the layer's output error with and without it, the way the
layer will run (dynamic per-tensor uint8 input, per-channel int8 weights), and keeps smoothing
only where it lowers the error.

>>> import torch
>>> torch.manual_seed(0)
<torch._C.Generator object at ...>
>>> x = torch.randn(512, 64) * torch.where(torch.arange(64) < 2, 40.0, 1.0)  # 2 outlier channels
>>> w = torch.randn(32, 64) / 8
>>> s, alpha, errors = smooth_search(w, [x], x.abs().amax(0), alphas=(0.5,), bits=7)
>>> alpha, errors[0.5] < 0.2 * errors[None]
(0.5, True)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from slimkit.quant.modules import dynamic_qparams, fake_quant_weight

__all__ = ["smoothing_scales", "dynamic_int8_error", "smooth_search"]


def smoothing_scales(act_absmax: Tensor, w: Tensor, alpha: float) -> Tensor:
    """Per-input-channel ``s`` for ``w`` ``[out, in]`` from the inputs' ``max|X_j|`` ``[in]``.
    Channels that never saw a nonzero input, or whose weight column is zero, keep ``s = 1``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant's alpha must be in [0, 1], got {alpha}")
    a = act_absmax.detach().float()
    wmax = w.detach().float().abs().amax(0)
    if a.shape != wmax.shape:
        raise ValueError(f"activation statistics for {a.numel()} channels, but the weight has {wmax.numel()} inputs")
    s = a.clamp_min(1e-5).pow(alpha) / wmax.clamp_min(1e-5).pow(1.0 - alpha)
    return torch.where((a > 0) & (wmax > 0), s, torch.ones_like(s))


def _dynamic_quant(x: Tensor) -> Tensor:
    scale, zp = dynamic_qparams(x)
    return (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale


def dynamic_int8_error(w: Tensor, xs: Sequence[Tensor], bits: int, scale: Tensor | None = None) -> float:
    """Mean squared error of ``x @ w^T`` when ``x`` is quantized per tensor at run time (one grid
    per element of ``xs``, as each call of the model gets its own) and ``w`` per output channel,
    after smoothing by ``scale`` if given."""
    w = w.detach().float()
    ws = w * scale if scale is not None else w
    wq = fake_quant_weight(ws, bits)
    total, n = 0.0, 0
    for x in xs:
        x = x.detach().float().reshape(-1, w.shape[1])
        xq = _dynamic_quant(x / scale if scale is not None else x)
        total += float(((xq @ wq.T - x @ w.T) ** 2).sum())
        n += x.shape[0] * w.shape[0]
    if n == 0:
        raise ValueError("SmoothQuant needs calibration inputs; the layer saw none")
    return total / n


def smooth_search(w: Tensor | Sequence[Tensor], xs: Sequence[Tensor], act_absmax: Tensor,
                  alphas: Sequence[float] = (0.5,), bits: int = 8
                  ) -> tuple[Tensor | None, float | None, dict[float | None, float]]:
    """The ``alpha`` among ``alphas`` (or none: ``None``) that gives the lowest output error on the
    inputs ``xs``. ``w`` may be several weights that read the same input (a transformer's query,
    key and value projections): they share one ``s``, from their columns' joint maximum, so the
    input is divided once, and their errors add. Returns the scales (``None`` when smoothing does
    not help), the alpha, and the error for each candidate."""
    ws = [w] if isinstance(w, Tensor) else list(w)
    joint = torch.cat([m.detach().float() for m in ws])

    def error(s: Tensor | None) -> float:
        return sum(dynamic_int8_error(m, xs, bits, s) for m in ws)

    errors: dict[float | None, float] = {None: error(None)}
    best: tuple[float, float | None, Tensor | None] = (errors[None], None, None)
    for alpha in alphas:
        s = smoothing_scales(act_absmax, joint, alpha)
        errors[alpha] = error(s)
        if errors[alpha] < best[0]:
            best = (errors[alpha], alpha, s)
    return best[2], best[1], errors
