"""AdaRound (Nagel, Amjad, van Baalen, Louizos and Blankevoort 2020, "Up or Down? Adaptive Rounding
for Post-Training Quantization"): instead of rounding every weight to the nearest grid point, learn
per weight whether to round down or up so that the layer's *outputs* on calibration data move least.

The rounding of ``w / s`` is ``floor(w / s) + h(V)`` with the rectified sigmoid
``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (eq. 23, zeta = 1.1, gamma = -0.1), and
``V`` minimises ``||W x - W~ x||^2 + lambda sum(1 - |2 h(V) - 1|^beta)`` (eq. 21 and 24): the
regulariser, with ``beta`` annealed from 20 to 2 after a warm-up, pushes every ``h(V)`` to 0 or 1.
The result is plain integer weights on the same grid, so nothing changes downstream: ``adaround``
returns float weights that round-to-nearest maps onto exactly the learned integers.

>>> import torch
>>> torch.manual_seed(0)
<torch._C.Generator object at ...>
>>> w, x = torch.randn(8, 16), torch.randn(256, 16) @ torch.randn(16, 16)  # correlated inputs
>>> scale = w.abs().amax(1) / 7
>>> def out(inputs, wq): return inputs @ wq.t()
>>> nearest = torch.round(w / scale[:, None]).clamp(-7, 7) * scale[:, None]
>>> learned = adaround(w, scale, -7, 7, out, [x[:128], x[128:]], iterations=300)
>>> bool(((out(x, learned) - out(x, w)) ** 2).mean() < ((out(x, nearest) - out(x, w)) ** 2).mean())
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["adaround", "rectified_sigmoid"]

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def adaround(weight: Tensor, scale: Tensor, qmin: int, qmax: int, forward: Callable[[Tensor, Tensor], Tensor],
             inputs: Sequence[Tensor], iterations: int = 1000, lr: float = 1e-2, reg: float = 3.0,
             warmup: float = 0.2, beta: tuple[float, float] = (20.0, 2.0), seed: int = 0,
             target_inputs: Sequence[Tensor] | None = None) -> Tensor:
    """Learned-rounding weights (on the grid ``scale * [qmin, qmax]``, ``scale`` per output channel).

    ``forward(x, w)`` is the layer's output (without its bias) on inputs ``x`` with weights ``w``;
    ``inputs`` are the layer's calibration inputs, one mini-batch per iteration in turn. Both terms
    are normalised so that ``reg`` means the same for every layer: the output MSE is divided by
    round-to-nearest's, and the regulariser is averaged over the weights. (With the paper's sums,
    the balance depends on the layer's size and output scale; on small layers the regulariser never
    wins, nothing is decided, and the result is round-to-nearest again.)

    ``target_inputs`` (the paper's asymmetric reconstruction, sec. 5): the target is the float
    weights on these inputs (the float model's, one per mini-batch of ``inputs``) rather than on
    ``inputs`` themselves, so the rounding also makes up for the error the inputs already carry.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if not inputs:
        raise ValueError("AdaRound needs calibration inputs for the layer")
    if target_inputs is not None and len(target_inputs) != len(inputs):
        raise ValueError(f"target_inputs must pair with inputs: {len(target_inputs)} against {len(inputs)}")
    sources = list(target_inputs) if target_inputs is not None else list(inputs)
    torch.manual_seed(seed)
    w = weight.detach().float()
    s = scale.detach().float().reshape([-1] + [1] * (w.dim() - 1))
    floor = torch.floor(w / s)
    rest = (w / s - floor).clamp(1e-4, 1 - 1e-4)
    # h(V) = rest at the start: begin from the exact weights
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_()
    opt = torch.optim.Adam([v], lr=lr)
    with torch.no_grad():
        nearest = s * torch.clamp(torch.round(w / s), qmin, qmax)
        norm = sum(float((forward(x, nearest) - forward(t, w)).pow(2).mean())
                   for x, t in zip(inputs, sources, strict=True)) / len(inputs)
    norm = max(norm, 1e-30)
    targets: dict[int, Tensor] = {}  # each mini-batch's float output, computed once
    for it in range(iterations):
        i = it % len(inputs)
        x = inputs[i]
        soft = s * torch.clamp(floor + rectified_sigmoid(v), qmin, qmax)
        if i not in targets:
            with torch.no_grad():
                targets[i] = forward(sources[i], w)
        rec = (forward(x, soft) - targets[i]).pow(2).mean() / norm
        t = it / iterations
        if t < warmup:
            loss = rec
        else:
            b = beta[1] + 0.5 * (beta[0] - beta[1]) * (1 + math.cos(math.pi * (t - warmup) / (1 - warmup)))
            h = rectified_sigmoid(v)
            loss = rec + reg * (1 - (2 * h - 1).abs().pow(b)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        q = torch.clamp(floor + (v >= 0).float(), qmin, qmax)
        # weights already on the grid (the channel's extreme among them) keep their integer, so the
        # grid's scale, recomputed from the result, stays the same
        on_grid = (w / s - torch.round(w / s)).abs() < 1e-4
        q = torch.where(on_grid, torch.round(w / s).clamp(qmin, qmax), q)
    return (q * s).to(weight.dtype)
