"""The shared training loop: SGD or AdamW with cosine decay, deterministic under a seed, with
distillation from a teacher, custom losses, a per-step hook, an evaluation callback and checkpoints
that resume exactly. Under ``torchrun`` it trains with DistributedDataParallel, unchanged for the
caller: each process takes its share of the batches, only rank 0 logs and writes the checkpoint,
and the epoch loss is averaged over the processes.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimkit.core.batch import call
from slimkit.core.files import temp_file
from slimkit.core.progress import progress
from slimkit.distill.losses import KDLoss

from .distributed import (
    average_gradients,
    barrier,
    broadcast_parameters,
    gather_objects,
    is_main,
    mean_over_ranks,
    process_group,
)

__all__ = ["fit", "accuracy"]

log = logging.getLogger(__name__)


def fit(model: nn.Module, data: Sequence[Any], epochs: int = 5, lr: float = 0.05,
        momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0, teacher: nn.Module | None = None,
        temperature: float = 4.0, alpha: float = 0.5, optimizer: str = "sgd",
        loss: Callable[[Any, Any], Tensor] | None = None,
        after_step: Callable[[int, int], None] | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        extra_loss: Callable[[], Tensor] | None = None,
        criterion: Callable[[Any, Tensor], Tensor] | None = None,
        evaluate: Callable[[nn.Module], float] | None = None) -> nn.Module:
    """Train ``model`` in place on ``(inputs, labels)`` batches with cross-entropy; returns it.

    With a ``teacher`` (fine-tuning after compression, the original model teaching), the loss is
    ``KDLoss(temperature, alpha)``; the teacher runs in eval mode under no_grad, once per batch.
    With a custom ``loss(student_out, teacher_out)`` (``teacher_out`` is None without a teacher),
    the batches are the model's inputs alone (a tensor, tuple or dict) and no labels are needed:
    feature distillation of an encoder, for example. ``optimizer`` is ``"sgd"`` (with momentum)
    or ``"adamw"``; the learning rate follows a cosine decay to zero either way.
    ``after_step(step, total_steps)`` runs after every optimizer step (a pruning schedule, say).

    ``criterion(output, labels)`` replaces cross-entropy on ``(inputs, labels)`` batches (a model
    with several outputs trained with a joint loss: mutual learning, early exits).
    ``evaluate(model)`` runs after every epoch with the model in eval mode; its number is logged.

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
    if criterion is not None and (teacher is not None or loss is not None):
        raise ValueError("fit: criterion replaces the label loss of a teacher-less run; with a teacher or a "
                         "custom loss, put it in that loss")
    first = next(iter(model.parameters()), None)
    rank, world = process_group(first.device if first is not None else torch.device("cpu"))
    per_rank = len(data) // world  # every process takes as many steps (DDP needs it); the rest wait a shuffle
    if per_rank == 0:
        raise ValueError(f"fit: {len(data)} batches cannot be shared among {world} processes")
    kd = KDLoss(temperature, alpha) if teacher is not None and loss is None else None
    if teacher is not None:
        teacher.eval()
    g = torch.Generator().manual_seed(seed)  # the same on every rank: one permutation, disjoint shares
    torch.manual_seed(seed + rank)  # dropout differs between ranks
    extra = list(extra_loss.parameters()) if isinstance(extra_loss, nn.Module) else []
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        broadcast_parameters(extra)
    opt: torch.optim.Optimizer
    params = list(model.parameters()) + extra
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * per_rank
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    settings = {"epochs": epochs, "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "seed": seed,
                "optimizer": optimizer, "batches": len(data), "distillation": teacher is not None,
                "processes": world}
    extra_module = extra_loss if isinstance(extra_loss, nn.Module) else None
    start = _resume(checkpoint, settings, model, extra_module, opt, sched, g, rank) if checkpoint is not None else 0
    model.train()
    bar = progress(total=steps, initial=start * per_rank, desc="training", disable=rank != 0)
    step = start * per_rank
    for epoch in range(start, epochs):
        order = torch.randperm(len(data), generator=g).tolist()[rank : per_rank * world : world]
        total = 0.0
        for i in order:
            if loss is not None:
                out = call(net, data[i])
                with torch.no_grad():
                    t_out = call(teacher, data[i]) if teacher is not None else None
                value = loss(out, t_out)
            else:
                x, y = data[i]
                out = call(net, x)
                if kd is not None:
                    assert teacher is not None
                    with torch.no_grad():
                        t_out = call(teacher, x)
                    value = kd(out, t_out, y)
                else:
                    value = (criterion or F.cross_entropy)(out, y)
            if extra_loss is not None:
                value = value + extra_loss()
            if not torch.isfinite(value):
                raise FloatingPointError(f"fit: the loss became {value.item()} in epoch {epoch + 1}; "
                                         f"lower the learning rate (lr={lr})")
            opt.zero_grad()
            value.backward()  # DDP averages the model's gradients over the ranks here
            average_gradients(extra)
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(step, steps)
            step += 1
            total += value.item()
            bar.update()
        mean_loss = mean_over_ranks(total / per_rank)
        if evaluate is not None:
            score = mean_over_ranks(float(evaluate(model.eval())))
            model.train()
            if is_main():
                log.info("epoch %d: loss %.4f, evaluation %.4f", epoch + 1, mean_loss, score)
        elif is_main():
            log.info("epoch %d: loss %.4f", epoch + 1, mean_loss)
        if checkpoint is not None:
            rngs = gather_objects(torch.get_rng_state())
            if is_main():
                _save(checkpoint, {"settings": settings, "epoch": epoch + 1, "model": model.state_dict(),
                                   "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                   "shuffle_rng": g.get_state(), "torch_rng": rngs,
                                   "extra": extra_module.state_dict() if extra_module is not None else {}})
            barrier()  # no rank runs ahead of the file it may have to resume from
    bar.close()
    return model.eval()


def _save(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _resume(path: str | os.PathLike[str], settings: dict[str, Any], model: nn.Module, extra: nn.Module | None,
            opt: torch.optim.Optimizer,
            sched: Any, g: torch.Generator, rank: int = 0) -> int:
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
        if extra is not None:  # a feature loss's adapters train with the model
            extra.load_state_dict(state["extra"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise ValueError(f"checkpoint {path} does not match this model: {e}") from e
    sched.load_state_dict(state["scheduler"])
    g.set_state(state["shuffle_rng"])
    torch.set_rng_state(state["torch_rng"][rank])
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
