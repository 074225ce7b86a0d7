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

__all__ = ["fraction_mask", "global_masks", "nm_mask", "nm_view", "weight_nm_mask", "hold_zeros"]


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


def nm_view(w: Tensor) -> Tensor:
    """A Linear or Conv2d weight (or its scores) with input channels innermost: [out, (kh, kw,) in]."""
    return w.permute(0, 2, 3, 1) if w.dim() == 4 else w


def weight_nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """The N:M mask of a Linear or Conv2d weight's ``scores``, in the weight's own layout, grouped
    along input channels."""
    mask = nm_mask(nm_view(scores), n, m)
    return mask.permute(0, 3, 1, 2) if scores.dim() == 4 else mask


class hold_zeros:  # noqa: N801 -- a context manager, named like one
    """While active, the zero weights of every Linear / Conv2d of ``model`` get zero gradients, so
    fine-tuning (SGD or AdamW, with weight decay) keeps an unstructured or N:M pattern exactly.

    >>> import torch
    >>> lin = torch.nn.Linear(4, 4)
    >>> with torch.no_grad():
    ...     _ = lin.weight[:, :2].zero_()
    >>> opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    >>> with hold_zeros(lin):
    ...     for _ in range(3):
    ...         opt.zero_grad(); lin(torch.randn(8, 4)).pow(2).sum().backward(); opt.step()
    >>> bool((lin.weight[:, :2] == 0).all())
    True
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> hold_zeros:
        for m in self.model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                keep = (m.weight != 0).to(m.weight.dtype).detach()
                self.handles.append(m.weight.register_hook(lambda g, k=keep: g * k))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
