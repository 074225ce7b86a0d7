"""A plain MLP for flattened images.

>>> import torch
>>> mlp()(torch.zeros(2, 1, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from torch import nn

__all__ = ["mlp"]


def mlp(num_classes: int = 10, in_features: int = 1024, hidden: tuple[int, ...] = (256, 128)) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_features
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)
