"""Self-distillation: the network is its own teacher, in one of two ways.

- **Exits** (Zhang et al. 2019, "Be Your Own Teacher"): classifier heads on intermediate layers
  (``prune.EarlyExit``) learn from the labels and from the network's own last output, softened;
  trained this way the shallow exits can answer easy inputs at run time.
- **Generations** (Furlanello et al. 2018, "Born-Again Neural Networks"): a trained network teaches
  a freshly initialised copy of itself, which then teaches the next one.

>>> import torch
>>> z, y = torch.tensor([[3.0, 0.0]]), torch.tensor([0])
>>> loss = ExitLoss(alpha=1.0)((z, z), y)  # an exit that agrees with the end adds nothing to its CE
>>> bool(torch.isclose(loss, F.cross_entropy(z, y)))
True
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimkit.core.batch import check_batches, model_inputs

from .config import DistillConfig
from .losses import KDLoss
from .offline import distill_offline

__all__ = ["ExitLoss", "distill_exits", "distill_generations"]


class ExitLoss(nn.Module):
    """``CE(final, y) + sum_i [(1 - alpha) CE(exit_i, y) + alpha T^2 KL(final || exit_i)]`` over the
    outputs ``(exit_1, ..., exit_k, final)``; the final output teaches as a constant."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5) -> None:
        super().__init__()
        self.kd = KDLoss(temperature, alpha)

    def forward(self, outputs: Sequence[Tensor], labels: Tensor) -> Tensor:
        *exits, final = outputs
        loss = F.cross_entropy(final, labels)
        for z in exits:
            loss = loss + self.kd(z, final.detach(), labels)
        return loss


def _batches(train_data: Sequence[Any]) -> list[Any]:
    data = check_batches(train_data, "train_data")
    if not (isinstance(data[0], (tuple, list)) and len(data[0]) == 2):
        raise ValueError("train_data: self-distillation needs (inputs, labels) batches")
    return data


def distill_exits(model: nn.Module, train_data: Sequence[Any], cfg: DistillConfig, inplace: bool = False,
                  checkpoint: str | os.PathLike[str] | None = None) -> nn.Module:
    """Add exits at ``cfg.exits`` and train them with the network (``ExitLoss``); returns the
    ``EarlyExit`` model in eval mode with ``threshold = cfg.exit_threshold``."""
    from slimkit.prune.early_exit import EarlyExit
    from slimkit.train import fit

    data = _batches(train_data)
    if cfg.hints:
        raise ValueError("hints are for a separate teacher; self-distillation with exits uses the responses")
    torch.manual_seed(cfg.seed)  # the heads' initial weights
    net = EarlyExit(model if inplace else copy.deepcopy(model), cfg.exits, example_inputs=model_inputs(data[0]))
    fit(net, data, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed,
        optimizer=cfg.optimizer, criterion=ExitLoss(cfg.temperature, cfg.alpha), checkpoint=checkpoint)
    net.threshold = cfg.exit_threshold
    return net.eval()


def _reinitialise(model: nn.Module) -> None:
    for m in model.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()


def distill_generations(model: nn.Module, train_data: Sequence[Any], cfg: DistillConfig, inplace: bool = False,
                        checkpoint: str | os.PathLike[str] | None = None) -> nn.Module:
    """Born-again training: the trained ``model`` teaches a re-initialised copy of itself, which
    teaches the next, ``cfg.generations`` times; returns the last generation."""
    data = _batches(train_data)
    teacher = model
    for g in range(cfg.generations):
        student = copy.deepcopy(teacher)
        torch.manual_seed(cfg.seed + g)
        _reinitialise(student)
        ckpt = None if checkpoint is None else Path(checkpoint).with_suffix(f".gen{g + 1}{Path(checkpoint).suffix}")
        teacher = distill_offline(student, teacher, data, cfg, inplace=True, checkpoint=ckpt)
    if inplace:
        model.load_state_dict(teacher.state_dict())
        return model.eval()
    return teacher
