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
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from slimkit.core.batch import call
from slimkit.distill.losses import KDLoss

__all__ = ["fit", "accuracy"]

log = logging.getLogger(__name__)


def fit(model: nn.Module, data: Sequence[Any], epochs: int = 5, lr: float = 0.05,
        momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0, teacher: nn.Module | None = None,
        temperature: float = 4.0, alpha: float = 0.5, optimizer: str = "sgd",
        loss: Callable[[Any, Any], Tensor] | None = None,
        after_step: Callable[[int, int], None] | None = None) -> nn.Module:
    """Train ``model`` in place on ``(inputs, labels)`` batches with cross-entropy; returns it.

    With a ``teacher`` (fine-tuning after compression, the original model teaching), the loss is
    ``KDLoss(temperature, alpha)``; the teacher runs in eval mode under no_grad, once per batch.
    With a custom ``loss(student_out, teacher_out)`` (``teacher_out`` is None without a teacher),
    the batches are the model's inputs alone (a tensor, tuple or dict) and no labels are needed:
    feature distillation of an encoder, for example. ``optimizer`` is ``"sgd"`` (with momentum)
    or ``"adamw"``; the learning rate follows a cosine decay to zero either way.
    ``after_step(step, total_steps)`` runs after every optimizer step (a pruning schedule, say).
    """
    if not data:
        raise ValueError("fit: the training data is empty")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"fit: optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    kd = KDLoss(temperature, alpha) if teacher is not None and loss is None else None
    if teacher is not None:
        teacher.eval()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt: torch.optim.Optimizer
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * len(data)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    bar = tqdm(total=steps, desc="training", leave=False, disable=None)
    step = 0
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=g).tolist()
        total = 0.0
        for i in order:
            if loss is not None:
                out = call(model, data[i])
                with torch.no_grad():
                    t_out = call(teacher, data[i]) if teacher is not None else None
                value = loss(out, t_out)
            else:
                x, y = data[i]
                out = model(x)
                if kd is not None:
                    assert teacher is not None
                    with torch.no_grad():
                        t_out = teacher(x)
                    value = kd(out, t_out, y)
                else:
                    value = F.cross_entropy(out, y)
            if not torch.isfinite(value):
                raise FloatingPointError(f"fit: the loss became {value.item()} in epoch {epoch + 1}; "
                                         f"lower the learning rate (lr={lr})")
            opt.zero_grad()
            value.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(step, steps)
            step += 1
            total += value.item()
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
