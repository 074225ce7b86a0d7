"""Pruning during training: the gradual polynomial sparsity schedule of Zhu and Gupta (2017).

Sparsity rises from ``initial`` to ``final`` between ``begin`` and ``end`` (fractions of the
training steps) as ``s_t = final + (initial - final) * (1 - p)^3``: fast at first, while the
network can still recover, then slowly. Every ``every`` steps the lowest-magnitude weights are
masked up to ``s_t``; after every step the mask is re-applied, so pruned weights stay at zero.

>>> [round(polynomial_sparsity(t, 100, 0.8), 3) for t in (0, 25, 50, 75, 99)]  # end=0.5: done by step 50
[0.0, 0.7, 0.8, 0.8, 0.8]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .masks import fraction_mask, global_masks

__all__ = ["polynomial_sparsity", "GradualPruning"]


def polynomial_sparsity(step: int, total: int, final: float, initial: float = 0.0, begin: float = 0.0,
                        end: float = 0.5, power: int = 3) -> float:
    """The scheduled sparsity at ``step`` of ``total``; ``begin``/``end`` are fractions of ``total``."""
    if not 0.0 <= initial <= final < 1.0:
        raise ValueError(f"need 0 <= initial <= final < 1, got initial={initial}, final={final}")
    if not 0.0 <= begin < end <= 1.0:
        raise ValueError(f"need 0 <= begin < end <= 1, got begin={begin}, end={end}")
    p = (step / max(total, 1) - begin) / (end - begin)
    p = min(max(p, 0.0), 1.0)
    return final + (initial - final) * (1.0 - p) ** power


class GradualPruning:
    """A ``fit(after_step=...)`` callback that prunes ``model``'s Linear / Conv2d weights (or
    ``layers``) by magnitude on the polynomial schedule, one ranking over all of them
    (``scope="global"``) or the same fraction in each (``"layer"``)."""

    def __init__(self, model: nn.Module, final: float, begin: float = 0.0, end: float = 0.5, every: int = 10,
                 scope: str = "global", layers: tuple[str, ...] = ()) -> None:
        polynomial_sparsity(0, 1, final, begin=begin, end=end)  # validates
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        if scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
        modules = dict(model.named_modules())
        for n in layers:
            if not isinstance(modules.get(n), (nn.Linear, nn.Conv2d)):
                raise ValueError(f"layer {n!r} is not a Linear or Conv2d of this model")
        self.layers = {n: m for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))
                       and (not layers or n in layers)}
        if not self.layers:
            raise ValueError("no Linear or Conv2d layer to prune")
        self.final, self.begin, self.end, self.every, self.scope = final, begin, end, every, scope
        self.masks: dict[str, Tensor] = {}
        self.sparsity = 0.0

    @torch.no_grad()
    def __call__(self, step: int, total: int) -> None:
        if step % self.every == 0 or step == total - 1:
            s = polynomial_sparsity(step, total, self.final, begin=self.begin, end=self.end)
            if s > self.sparsity or not self.masks:
                scores = {n: m.weight.abs() for n, m in self.layers.items()}
                if self.scope == "global":
                    self.masks = dict(zip(scores, global_masks(list(scores.values()), s), strict=True))
                else:
                    self.masks = {n: fraction_mask(v, s) for n, v in scores.items()}
                self.sparsity = s
        for n, m in self.layers.items():
            if n in self.masks:
                m.weight.mul_(self.masks[n].to(m.weight.dtype))
