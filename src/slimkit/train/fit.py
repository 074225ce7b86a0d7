"""A small supervised training loop: SGD with momentum and cosine decay, deterministic under a seed.

>>> import torch
>>> from torch import nn
>>> m = nn.Linear(2, 2)
>>> data = [(torch.randn(8, 2), torch.randint(0, 2, (8,)))]
>>> fit(m, data, epochs=1, lr=0.1) is m
True
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimkit.distill.losses import KDLoss

__all__ = ["fit", "accuracy"]

log = logging.getLogger(__name__)


def fit(model: nn.Module, data: Sequence[tuple[Tensor, Tensor]], epochs: int = 5, lr: float = 0.05,
        momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0, teacher: nn.Module | None = None,
        temperature: float = 4.0, alpha: float = 0.5) -> nn.Module:
    """Train ``model`` in place on ``(inputs, labels)`` batches with cross-entropy; returns it.

    With a ``teacher`` (fine-tuning after compression, the original model teaching), the loss is
    ``KDLoss(temperature, alpha)``; the teacher runs in eval mode under no_grad, once per batch.
    """
    if not data:
        raise ValueError("fit: the training data is empty")
    kd = KDLoss(temperature, alpha) if teacher is not None else None
    if teacher is not None:
        teacher.eval()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps = epochs * len(data)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    bar = tqdm(total=steps, desc="training", leave=False, disable=None)
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=g).tolist()
        total = 0.0
        for i in order:
            x, y = data[i]
            out = model(x)
            if teacher is not None:
                assert kd is not None
                with torch.no_grad():
                    t_out = teacher(x)
                loss = kd(out, t_out, y)
            else:
                loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            bar.update()
        log.info("epoch %d: loss %.4f", epoch + 1, total / len(data))
    bar.close()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    return 100.0 * correct / len(x)
