"""How many channels each group keeps, and which: the allocation step of structured pruning's search
(``plan.py``), uniform per group or with one global threshold, whole parts per grouped conv."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["keep_count", "kept_channels", "global_counts"]


def keep_count(size: int, sparsity: float, round_to: int) -> int:
    keep = size - math.floor(sparsity * size + 1e-9)
    if round_to > 1:
        keep = min(size, math.ceil(keep / round_to) * round_to)
    return max(1, keep)


def kept_channels(total: Tensor, k: int, chunks: int) -> Tensor:
    """The indices of the ``k`` best channels, the same number from each of ``chunks`` equal parts
    (``k`` rounded up to a multiple of ``chunks``), in order."""
    if chunks == 1:
        return torch.sort(torch.topk(total, k, sorted=False).indices).values
    per, each = total.numel() // chunks, max(1, math.ceil(k / chunks))
    parts = total.reshape(chunks, per).topk(min(each, per), dim=1, sorted=False).indices
    return torch.sort((parts + torch.arange(chunks).unsqueeze(1) * per).flatten()).values


def global_counts(candidates: list[tuple[Any, dict[str, Any], Tensor, int]], sparsity: float) -> list[int]:
    """Channels kept per group when one threshold runs over every group's scores (each group's
    scores normalized to mean 1, so groups compare by how unequal their channels are, not by the
    size of their weights): the least important ``sparsity`` of all channels go, wherever they are.
    A group keeps at least one channel (``round_to`` channels when rounding)."""
    if not candidates:
        return []
    pooled = torch.cat([t for _, _, t, _ in candidates])
    n_remove = math.floor(sparsity * pooled.numel() + 1e-9)
    if n_remove == 0:
        return [g.size for g, _, _, _ in candidates]
    threshold = torch.kthvalue(pooled.double(), n_remove).values
    counts = []
    for g, _, total, round_to in candidates:
        keep = int((total.double() > threshold).sum())
        if round_to > 1:
            keep = math.ceil(keep / round_to) * round_to
        counts.append(min(g.size, max(keep, round_to, 1)))
    return counts
