"""Importance scores: how much a weight or a channel matters.

Magnitude (L1 / L2 norms; Li et al. 2017 for filters) needs only the weights. First-order Taylor
(Molchanov et al. 2017/2019) estimates the loss change of removing a weight as ``|w * dL/dw|``,
from the gradients of a few batches; a channel's score sums those of its weights.

>>> import torch
>>> w = torch.tensor([[1.0, -1.0], [0.1, 0.2], [-3.0, 0.0]])
>>> channel_scores(w, "l1").tolist()
[2.0, 0.30000001192092896, 3.0]
>>> taylor_scores(w, torch.ones_like(w)).tolist()
[[1.0, 1.0], [0.10000000149011612, 0.20000000298023224], [3.0, 0.0]]
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["weight_scores", "channel_scores", "taylor_scores"]


def taylor_scores(w: Tensor, grad: Tensor) -> Tensor:
    """``|w * grad|``: the first-order estimate of the loss change when each weight is zeroed."""
    if grad.shape != w.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} does not match the weight's {tuple(w.shape)}")
    return (w.detach() * grad.detach()).abs()


def weight_scores(w: Tensor, importance: str, grad: Tensor | None = None) -> Tensor:
    """One score per weight (same shape as ``w``)."""
    if importance == "taylor":
        if grad is None:
            raise ValueError("taylor importance needs gradients (give data)")
        return taylor_scores(w, grad)
    return w.detach().abs() if importance == "l1" else w.detach().pow(2)


def channel_scores(w: Tensor, importance: str, grad: Tensor | None = None, dim: int = 0) -> Tensor:
    """One score per slice of ``w`` along ``dim`` (dim 0: output channels, 1: input channels):
    the sum of its weight scores (L2: the root of the summed squares)."""
    s = weight_scores(w, importance, grad).double()
    per = s.transpose(0, dim).reshape(s.shape[dim], -1).sum(1)
    return (per.sqrt() if importance == "l2" else per).to(torch.float32)
