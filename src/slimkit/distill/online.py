"""Online distillation, deep mutual learning (Zhang, Xiang, Hospedales and Lu 2018, "Deep Mutual
Learning"): two or more students train together from scratch or from a checkpoint, and each one
learns from the labels and from the others' softened predictions; there is no pre-trained teacher.

Student ``k``'s loss is ``(1 - alpha) * CE(z_k, y) + alpha * mean_{l != k} T^2 KL(p_l || p_k)`` with
the peers' ``p_l`` held constant (eq. 4 and 5 of the paper, with the temperature of Hinton et al.).
All students step together on the summed loss; since each student's term only sees its peers as
constants, that is each student descending its own loss.

>>> import torch
>>> z = (torch.tensor([[2.0, 0.0]]), torch.tensor([[2.0, 0.0]]))
>>> float(MutualLoss(alpha=1.0)(z, torch.tensor([0])))  # students that agree teach each other nothing
0.0
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from slimkit.core.batch import call, check_batches, model_inputs, modes_kept, tensors_of

from .config import DistillConfig
from .losses import KDLoss

__all__ = ["MutualLoss", "Cohort", "distill_online"]


class MutualLoss(nn.Module):
    """The summed deep-mutual-learning loss of a cohort's logits ``(z_1, ..., z_K)``."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5) -> None:
        super().__init__()
        self.kd = KDLoss(temperature, alpha)

    def forward(self, logits: Sequence[Tensor], labels: Tensor) -> Tensor:
        if len(logits) < 2:
            raise ValueError(f"mutual learning needs at least two students' logits, got {len(logits)}")
        total = logits[0].new_zeros(())
        for k, z in enumerate(logits):
            peers = [p for j, p in enumerate(logits) if j != k]
            soft = sum((self.kd(z, p.detach(), None) for p in peers), z.new_zeros(())) / len(peers)
            total = total + self.kd.alpha * soft + (1 - self.kd.alpha) * nn.functional.cross_entropy(z, labels)
        return total


class Cohort(nn.Module):
    """Students run side by side on the same batch: the output is the tuple of their outputs."""

    def __init__(self, students: Sequence[nn.Module]) -> None:
        super().__init__()
        self.students = nn.ModuleList(students)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        return tuple(s(*args, **kwargs) for s in self.students)


def distill_online(students: Sequence[nn.Module], train_data: Sequence[Any], cfg: DistillConfig,
                   inplace: bool = False, checkpoint: str | os.PathLike[str] | None = None) -> list[nn.Module]:
    """Train ``students`` (two or more) by mutual learning on ``(inputs, labels)`` batches; returns
    them trained (copies unless ``inplace``), in the order given."""
    from slimkit.train import fit

    if len(students) < 2:
        raise ValueError(f"online distillation needs at least two students, got {len(students)}")
    if cfg.hints:
        raise ValueError("hints (feature distillation) need a teacher; online distillation uses the responses only")
    data = check_batches(train_data, "train_data")
    first = data[0]
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        raise ValueError("train_data: mutual learning needs (inputs, labels) batches")
    group = [s if inplace else copy.deepcopy(s) for s in students]
    if len({id(s) for s in group}) < len(group):
        raise ValueError("the students must be distinct modules (pass copies to train twins)")
    x = model_inputs(first)
    shapes = []
    with modes_kept(*group), torch.no_grad():
        for s in group:
            shapes.append([tuple(t.shape) for t in tensors_of(call(s.eval(), x))])
    if any(sh != shapes[0] for sh in shapes):
        raise ValueError(f"the students' outputs differ in shape ({shapes}); they must predict the same classes")
    fit(Cohort(group), data, epochs=cfg.epochs, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed,
        optimizer=cfg.optimizer, criterion=MutualLoss(cfg.temperature, cfg.alpha), checkpoint=checkpoint)
    return group
