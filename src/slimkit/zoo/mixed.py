"""A small CNN made of everything real CNNs mix (the structured-pruning benchmark's test bed): a
residual add, a concatenation, a pointwise -> grouped -> depthwise chain, squeeze-excite gating
(a channel-wise product with a pooled, squeezed and re-expanded copy) and a flatten into the
classifier. For 32x32 single-channel digits by default.

>>> import torch
>>> mixed_cnn()(torch.randn(2, 1, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MixedBlock", "MixedCNN", "mixed_cnn"]


class MixedBlock(nn.Module):
    """``x + project(cat(gate(dw(grouped(pw(x)))), side(x)))``: ``c`` channels in and out."""

    def __init__(self, c: int, groups: int = 4) -> None:
        super().__init__()
        self.pw = nn.Sequential(nn.Conv2d(c, 2 * c, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=groups, bias=False),
                                     nn.BatchNorm2d(2 * c), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False),
                                nn.BatchNorm2d(2 * c), nn.ReLU6())
        self.se_reduce = nn.Conv2d(2 * c, c // 2, 1)
        self.se_expand = nn.Conv2d(c // 2, 2 * c, 1)
        self.side = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(3 * c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: Tensor) -> Tensor:
        y = self.dw(self.grouped(self.pw(x)))
        gate = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        y = torch.cat([y * gate, self.side(x)], 1)
        return torch.relu(x + self.project(y))


class MixedCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        c = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(c), nn.ReLU())
        self.block1 = MixedBlock(c)
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c),
                                  nn.ReLU())
        self.block2 = MixedBlock(2 * c)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(2 * c * 4, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.down(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def mixed_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> MixedCNN:
    return MixedCNN(num_classes, in_channels, width)
