"""Sparsity masks from scores: a fraction per tensor, one global threshold, or N:M.

>>> import torch
>>> s = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.6, 0.7, 0.8]])
>>> fraction_mask(s, 0.5).int().tolist()  # over the whole tensor
[[1, 1, 1, 1], [0, 0, 0, 0]]
>>> nm_mask(s, 2, 4).int().tolist()
[[1, 0, 1, 0], [0, 0, 1, 1]]
>>> [m.int().tolist() for m in global_masks([torch.tensor([1.0, 5.0]), torch.tensor([2.0, 3.0])], 0.5)]
[[0, 1], [0, 1]]
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fraction_mask", "global_masks", "nm_mask"]


def _keep_top(scores: Tensor, k: int) -> Tensor:
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        # stable: ties broken by position, so the mask is deterministic
        order = torch.sort(scores.flatten().double(), descending=True, stable=True).indices
        mask[order[:k]] = True
    return mask.reshape(scores.shape)


def fraction_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Keep the ``1 - sparsity`` highest-scoring entries (``True`` = kept)."""
    n = scores.numel()
    return _keep_top(scores, n - int(round(sparsity * n)))


def global_masks(scores: list[Tensor], sparsity: float) -> list[Tensor]:
    """One ranking over every tensor together: the ``sparsity`` lowest scores anywhere are removed."""
    flat = torch.cat([s.flatten().double() for s in scores])
    keep = _keep_top(flat, flat.numel() - int(round(sparsity * flat.numel())))
    out, start = [], 0
    for s in scores:
        out.append(keep[start:start + s.numel()].reshape(s.shape))
        start += s.numel()
    return out


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive entries along the last dimension."""
    if scores.shape[-1] % m:
        raise ValueError(f"the last dimension ({scores.shape[-1]}) is not a multiple of m={m}")
    groups = scores.double().reshape(-1, m)
    top = torch.topk(groups, n, dim=1, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
    return mask.reshape(scores.shape)
