"""Importance scores: how much a weight matters.

Magnitude (L1 / L2; Li et al. 2017 for filters) needs only the weights. First-order Taylor
(Molchanov et al. 2017/2019) estimates the loss change of removing a weight as ``|w * dL/dw|``,
from the gradients of a few batches. A channel's score sums those of its weights (``plan.py``).

>>> import torch
>>> w = torch.tensor([[1.0, -2.0]])
>>> weight_scores(w, "l1").tolist(), weight_scores(w, "l2").tolist()
([[1.0, 2.0]], [[1.0, 4.0]])
>>> taylor_scores(w, torch.tensor([[0.5, 0.5]])).tolist()
[[0.5, 1.0]]
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["weight_scores", "taylor_scores"]


def taylor_scores(w: Tensor, grad: Tensor) -> Tensor:
    """``|w * grad|``: the first-order estimate of the loss change when each weight is zeroed."""
    if grad.shape != w.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} does not match the weight's {tuple(w.shape)}")
    return (w.detach() * grad.detach()).abs()


def weight_scores(w: Tensor, importance: str) -> Tensor:
    """One magnitude score per weight (same shape as ``w``): ``|w|`` for l1, ``w^2`` for l2."""
    if importance not in ("l1", "l2"):
        raise ValueError(f"magnitude importance is 'l1' or 'l2', got {importance!r}")
    return w.detach().abs() if importance == "l1" else w.detach().pow(2)
