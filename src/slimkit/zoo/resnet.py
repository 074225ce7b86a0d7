"""A ResNet-18-shaped network (He et al. 2016): four stages of two basic blocks, BatchNorm, residual
additions. ``width=64`` is the real ResNet-18; ``small_input=True`` uses a 3x3 stem without max
pooling for 32x32 images.

>>> import torch
>>> resnet18(width=8, in_channels=1, small_input=True)(torch.zeros(2, 1, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["resnet18", "BasicBlock"]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))  # [N, cout, H/s, W/s]
        y = self.bn2(self.conv2(y))
        return self.relu2(y + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, num_classes: int, width: int, in_channels: int, small_input: bool) -> None:
        super().__init__()
        if small_input:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        widths = [width, width * 2, width * 4, width * 8]
        layers, cin = [], width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, w, stride), BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))  # [N, 8w, H/8 or H/32, ...]
        return self.fc(self.flatten(self.pool(x)))  # [N, classes]


def resnet18(num_classes: int = 10, width: int = 64, in_channels: int = 3,
             small_input: bool = False) -> nn.Module:
    return ResNet(num_classes, width, in_channels, small_input)
