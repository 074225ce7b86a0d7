"""Sparsity regularization during training: a penalty added to the loss that pushes weights (or whole
channels) towards zero, so that pruning afterwards removes less of what the network uses.

- ``"l1"``: the sum of the absolute weights of the chosen Linear / Conv2d layers (unstructured pruning).
- ``"group"``: group lasso, the sum over output channels of each channel's L2 norm (structured
  pruning of channels).
- ``"bn"``: the sum of the absolute BatchNorm scales (gamma), as in network slimming: a channel whose
  scale goes to zero can be cut whatever its conv weights are.

Sums, as the papers write them, so ``strength`` is their lambda (network slimming used 1e-4 to 1e-5).

Use it as ``fit(model, data, extra_loss=SparsityPenalty(model, 1e-3, "group"))``.

>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
>>> with torch.no_grad():
...     for p in m.parameters():
...         _ = p.fill_(0.5)
>>> round(float(SparsityPenalty(m, 2.0, "l1")().detach()), 4)  # 2 x (18 weights x 0.5)
18.0
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["SparsityPenalty", "PENALTIES"]

PENALTIES = ("l1", "group", "bn")


class SparsityPenalty:
    """``strength`` x the penalty of ``kind`` over ``layers`` (default: every Linear / Conv2d, or
    every BatchNorm for ``"bn"``). Call it for the penalty as a scalar tensor with a gradient."""

    def __init__(self, model: nn.Module, strength: float, kind: str = "l1", layers: tuple[str, ...] = ()) -> None:
        if kind not in PENALTIES:
            raise ValueError(f"kind must be one of {', '.join(map(repr, PENALTIES))}; got {kind!r}")
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not strength >= 0:
            raise ValueError(f"strength must be a number >= 0, got {strength!r}")
        types: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d) if kind == "bn" else (nn.Linear, nn.Conv2d)
        modules = dict(model.named_modules())
        for name in layers:
            if not isinstance(modules.get(name), types):
                raise ValueError(f"layer {name!r} is not a {' / '.join(t.__name__ for t in types)} of this model")
        self.weights: list[Tensor] = [getattr(m, "weight") for n, m in modules.items() if isinstance(m, types)  # noqa: B009
                                      and (not layers or n in layers) and isinstance(getattr(m, "weight", None), Tensor)]
        if not self.weights:
            raise ValueError(f"the model has no {' / '.join(t.__name__ for t in types)} layer with weights "
                             f"for the {kind!r} penalty")
        self.strength, self.kind = float(strength), kind

    def __call__(self) -> Tensor:
        total: Tensor = torch.zeros(())
        for w in self.weights:
            if self.kind == "group":
                total = total + w.reshape(w.shape[0], -1).norm(dim=1).sum()
            else:
                total = total + w.abs().sum()
        return self.strength * total
