"""The shared training loop: SGD or AdamW with cosine decay, deterministic under a seed, with
distillation from a teacher, custom losses, a per-step hook and checkpoints that resume exactly.

>>> import torch
>>> from torch import nn
>>> m = nn.Linear(2, 2)
>>> data = [(torch.randn(8, 2), torch.randint(0, 2, (8,)))]
>>> fit(m, data, epochs=1, lr=0.1) is m
True
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
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
        after_step: Callable[[int, int], None] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        extra_loss: Callable[[], Tensor] | None = None) -> nn.Module:
    """Train ``model`` in place on ``(inputs, labels)`` batches with cross-entropy; returns it.

    With a ``teacher`` (fine-tuning after compression, the original model teaching), the loss is
    ``KDLoss(temperature, alpha)``; the teacher runs in eval mode under no_grad, once per batch.
    With a custom ``loss(student_out, teacher_out)`` (``teacher_out`` is None without a teacher),
    the batches are the model's inputs alone (a tensor, tuple or dict) and no labels are needed:
    feature distillation of an encoder, for example. ``optimizer`` is ``"sgd"`` (with momentum)
    or ``"adamw"``; the learning rate follows a cosine decay to zero either way.
    ``after_step(step, total_steps)`` runs after every optimizer step (a pruning schedule, say).

    ``extra_loss()`` is added to the loss after both forward passes (``FeatureKD`` is one); when it
    is an ``nn.Module`` its parameters (adapters) are trained with the model's.

    ``checkpoint`` (a file path): the full training state (weights, optimizer, schedule, shuffling
    and dropout random states) is written there atomically after every epoch, and a run that finds
    it resumes from it and ends with exactly the weights an uninterrupted run would have. The
    run's settings must match the checkpoint's; a mismatch is an error naming the setting.
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
    params = list(model.parameters()) + (list(extra_loss.parameters()) if isinstance(extra_loss, nn.Module) else [])
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * len(data)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    settings = {"epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "seed": seed,
                "optimizer": optimizer, "batches": len(data), "distillation": teacher is not None}
    start = _resume(checkpoint, settings, model, opt, sched, g) if checkpoint is not None else 0
    model.train()
    bar = tqdm(total=steps, initial=start * len(data), desc="training", leave=False, disable=None)
    step = start * len(data)
    for epoch in range(start, epochs):
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
            if extra_loss is not None:
                value = value + extra_loss()
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
        if checkpoint is not None:
            _save(checkpoint, {"settings": settings, "epoch": epoch + 1, "model": model.state_dict(),
                               "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                               "shuffle_rng": g.get_state(), "torch_rng": torch.get_rng_state()})
    bar.close()
    return model.eval()


def _save(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _resume(path: str | os.PathLike[str], settings: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
            sched: Any, g: torch.Generator) -> int:
    """Restore the state saved at ``path`` (if any); returns the number of epochs already done."""
    path = Path(path)
    if not path.exists():
        return 0
    try:
        state = torch.load(path, weights_only=True)  # plain tensors and numbers: nothing is unpickled
        saved, epoch = state["settings"], int(state["epoch"])
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable or not a slimkit checkpoint: {e}") from e
    for key, value in settings.items():
        if saved.get(key) != value:
            raise ValueError(f"checkpoint {path} was made with {key}={saved.get(key)!r}, this run has {key}={value!r}; "
                             "resume with the same settings or use a new checkpoint path")
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ValueError(f"checkpoint {path} does not match this model: {e}") from e
    sched.load_state_dict(state["scheduler"])
    g.set_state(state["shuffle_rng"])
    torch.set_rng_state(state["torch_rng"])
    log.info("resuming from %s after epoch %d", path, epoch)
    return epoch


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    return 100.0 * correct / len(x)
