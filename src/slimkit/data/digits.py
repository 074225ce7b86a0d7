"""scikit-learn's bundled handwritten digits (1,797 images of 8x8), upscaled to 32x32 so that
convolutional nets have something to work with. Deterministic split: 1,437 train, 360 test.

>>> d = load_digits32()
>>> d.train_x.shape, d.test_x.shape
(torch.Size([1437, 1, 32, 32]), torch.Size([360, 1, 32, 32]))
>>> len(batches(d.test_x, d.test_y, 100))
4
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Digits", "load_digits32", "batches", "task", "digits_accuracy"]


@dataclass(frozen=True)
class Digits:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def load_digits32(size: int = 32, seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = 1437
    return Digits(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def batches(x: Tensor, y: Tensor | None = None, batch_size: int = 64) -> list:
    """Split into batches: a list of ``(inputs, labels)`` pairs, or of inputs when ``y`` is None."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out = []
    for i in range(0, len(x), batch_size):
        out.append(x[i : i + batch_size] if y is None else (x[i : i + batch_size], y[i : i + batch_size]))
    return out


def task() -> dict[str, Any]:
    """The digits as a recipe's ``data`` (``slimkit.data:task``): ``train`` ``(inputs, labels)``
    batches of 32, ``calib`` the first 256 training images in batches of 32, ``example`` 8 test images."""
    d = load_digits32()
    return {"train": batches(d.train_x, d.train_y, 32), "calib": batches(d.train_x[:256], None, 32),
            "example": d.test_x[:8]}


@torch.no_grad()
def digits_accuracy(model: nn.Module) -> float:
    """Top-1 accuracy in percent on the 360 test digits: a recipe's ``evaluate``
    (``slimkit.data:digits_accuracy``). Works on an ``OrtModule`` too, so it measures ONNX files."""
    d = load_digits32()
    model.eval()
    pred = torch.cat([model(d.test_x[i : i + 128]).argmax(-1) for i in range(0, len(d.test_x), 128)])
    return float(100.0 * (pred == d.test_y).float().mean())
