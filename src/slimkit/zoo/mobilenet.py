"""A MobileNetV2-shaped network (Sandler et al. 2018): inverted residual blocks with a 1x1
expansion, a 3x3 depthwise conv, a linear 1x1 projection, ReLU6, and residuals where shapes allow.

>>> import torch
>>> mobilenet_v2(width_mult=0.25, in_channels=1, small_input=True)(torch.zeros(2, 1, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["mobilenet_v2", "InvertedResidual"]

# (expansion t, channels c, repeats n, first stride s), as in the paper's Table 2
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1)]


def _c(v: float) -> int:
    return max(8, int(v + 4) // 8 * 8)


def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = cin * t
        layers: list[nn.Module] = [] if t == 1 else [_conv_bn(cin, hidden, 1, 1)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, width_mult: float, in_channels: int, small_input: bool) -> None:
        super().__init__()
        cin = _c(32 * width_mult)
        layers: list[nn.Module] = [_conv_bn(in_channels, cin, 3, 1 if small_input else 2)]
        for i, (t, c, n, s) in enumerate(_SETTINGS):
            cout = _c(c * width_mult)
            for j in range(n):
                stride = s if j == 0 and not (small_input and i == 1) else 1
                layers.append(InvertedResidual(cin, cout, stride, t))
                cin = cout
        last = _c(1280 * max(1.0, width_mult)) if not small_input else _c(1280 * width_mult)
        layers.append(_conv_bn(cin, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


def mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3,
                 small_input: bool = False) -> nn.Module:
    return MobileNetV2(num_classes, width_mult, in_channels, small_input)
