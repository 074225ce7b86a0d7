"""Teaching structured pruning a layer type it does not know (the shape of Torch-Pruning's
customized pruners). Register a ``PrunableLayer`` for the class: how many output and input channels
an instance has, how to keep some of them (in place), and the weight its channels are scored by. The
dependency graph then treats every instance as one opaque call whose input channels it reads and whose
output channels it makes (``per_channel=True``: output channel ``c`` comes from input channel ``c``
alone, as in a BatchNorm), and ``sk.prune``, ``sk.save`` / ``sk.load`` cut it like a built-in layer.

>>> import torch
>>> from torch import nn
>>> import slimkit as sk
>>> class Scaled(nn.Module):  # a Linear whose outputs are scaled per channel, a layer type of one's own
...     def __init__(self, n_in, n_out):
...         super().__init__()
...         self.weight = nn.Parameter(torch.randn(n_out, n_in))
...         self.scale = nn.Parameter(torch.rand(n_out) + 0.5)
...     def forward(self, x):
...         return torch.nn.functional.linear(x, self.weight) * self.scale
>>> def keep(m, out, inn):
...     if out is not None:
...         m.weight, m.scale = nn.Parameter(m.weight[out]), nn.Parameter(m.scale[out])
...     if inn is not None:
...         m.weight = nn.Parameter(m.weight[:, inn])
>>> register_prunable(Scaled, PrunableLayer(out_channels=lambda m: m.weight.shape[0],
...                                          in_channels=lambda m: m.weight.shape[1], cut=keep))
>>> model = nn.Sequential(Scaled(16, 32), nn.ReLU(), nn.Linear(32, 4))
>>> p = sk.prune(model, {"method": "structured", "sparsity": 0.5}, example_inputs=torch.randn(2, 16))
>>> tuple(p[0].weight.shape), tuple(p[0].scale.shape), tuple(p[2].weight.shape)
((16, 16), (16,), (4, 16))
>>> unregister_prunable(Scaled)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["PrunableLayer", "register_prunable", "unregister_prunable", "rule_for"]


def _weight(m: nn.Module) -> Tensor | None:
    w = getattr(m, "weight", None)
    return w if isinstance(w, Tensor) else None


@dataclass(frozen=True)
class PrunableLayer:
    """How structured pruning follows and cuts instances of one layer type.

    - ``out_channels(m)`` / ``in_channels(m)``: the sizes of its output's and input's channel axis
      (axis 1 of a ``[batch, channels, ...]`` tensor).
    - ``cut(m, out, inn)``: keep these output and input channel indices (LongTensors; ``None``: that
      side stays whole), in place, updating whatever attributes hold the sizes.
    - ``weight(m)``: the tensor its channels are scored by: ``[out, in, ...]``, or for a
      ``per_channel`` layer one value per channel; ``None`` gives it no say in the scores.
    - ``per_channel``: output channel ``c`` is made from input channel ``c`` alone (a normalization, a
      per-channel scale); its channels then belong to the group of its input's.
    """

    out_channels: Callable[[nn.Module], int]
    in_channels: Callable[[nn.Module], int]
    cut: Callable[[nn.Module, Tensor | None, Tensor | None], None]
    weight: Callable[[nn.Module], Tensor | None] = _weight
    per_channel: bool = False


_RULES: dict[type, PrunableLayer] = {}


def register_prunable(cls: type, rule: PrunableLayer) -> None:
    """Teach structured pruning ``cls`` (and its subclasses)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_prunable takes an nn.Module subclass, got {cls!r}")
    if not isinstance(rule, PrunableLayer):
        raise TypeError(f"register_prunable takes a PrunableLayer rule, got {type(rule).__name__}")
    _RULES[cls] = rule


def unregister_prunable(cls: type) -> None:
    _RULES.pop(cls, None)


def rule_for(m: nn.Module) -> PrunableLayer | None:
    """The registered rule of ``m``'s class or its nearest registered base class."""
    for klass in type(m).__mro__:
        if klass in _RULES:
            return _RULES[klass]
    return None
