"""Importance scores: how much a weight matters.

Magnitude (L1 / L2; Li et al. 2017 for filters) needs only the weights. First-order Taylor
(Molchanov et al. 2017/2019) estimates the loss change of removing a weight as ``|w * dL/dw|``,
from the gradients of a few batches: of the cross-entropy for labelled batches, and for batches
without labels of a random projection of the output, which makes ``|w * dL/dw|`` measure how far
removing ``w`` moves the output (``taylor_importance``). A channel's score sums those of its
weights (``plan.py``).

>>> import torch
>>> w = torch.tensor([[1.0, -2.0]])
>>> weight_scores(w, "l1").tolist(), weight_scores(w, "l2").tolist()
([[1.0, 2.0]], [[1.0, 4.0]])
>>> taylor_scores(w, torch.tensor([[0.5, 0.5]])).tolist()
[[0.5, 1.0]]
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimkit.core.batch import Batch, call, check_batches, first_tensor, model_inputs

__all__ = ["weight_scores", "taylor_scores", "taylor_importance"]


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


def _taylor_loss(out: Any, batch: Batch, i: int, g: torch.Generator) -> Tensor:
    """Cross-entropy for an ``(inputs, integer labels)`` batch. For inputs alone, ``<r, f(x)>`` with
    ``r`` a fixed Gaussian draw (padding positions of a tokenizer batch left out): its gradient times
    ``w`` is Gaussian with spread ``||w * df/dw||``, so ``|w * grad|`` averaged over batches ranks
    weights by how far removing them moves the output, with no labels needed."""
    y = first_tensor(out)
    x = model_inputs(batch)
    if x is not batch:
        labels = batch[1]  # type: ignore[index]
        if y.dim() != 2 or y.shape[0] != labels.shape[0]:
            raise ValueError(f"data batch {i}: taylor importance with labels needs [N, classes] logits and N labels; "
                             f"the model returned shape {tuple(y.shape)} for {tuple(labels.shape)} labels "
                             "(give the inputs alone for the label-free output-sensitivity score)")
        return F.cross_entropy(y, labels)
    r = torch.randn(y.shape, generator=g).to(y.dtype)
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, Tensor) and y.dim() >= 2 and tuple(y.shape[:2]) == tuple(mask.shape):
        r = r * mask.reshape(*mask.shape, *[1] * (y.dim() - 2)).to(y.dtype)
    return (r * y).sum()


def taylor_importance(model: nn.Module, data: Iterable[Batch]) -> dict[str, Tensor]:
    """Per parameter, the sum over ``data`` batches of ``|w * dL/dw|`` (first-order Taylor
    importance): ``L`` is the cross-entropy for ``(inputs, integer labels)`` batches and a random
    projection of the output for batches of inputs alone (``_taylor_loss``)."""
    batches = check_batches(data, "data")
    work = copy.deepcopy(model).eval()
    acc: dict[str, Tensor] = {}
    g = torch.Generator().manual_seed(0)
    for i, b in enumerate(batches):
        work.zero_grad()
        _taylor_loss(call(work, model_inputs(b)), b, i, g).backward()
        for n, p in work.named_parameters():
            if p.grad is not None:
                s = taylor_scores(p, p.grad)
                acc[n] = acc[n] + s if n in acc else s
    return acc
